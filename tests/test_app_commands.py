"""``visage serve`` start-up: what the command sets up before uvicorn takes over (the request paths themselves are
tested against a real uvicorn in test_app_e2e.py)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from app_helpers import fake_pipeline

from model.console import main

PASSED_ON = ("VISAGE_DATA_DIR", "VISAGE_WEIGHTS", "VISAGE_HOST", "VISAGE_PORT", "VISAGE_WORKERS")


def test_serve_hands_uvicorn_the_app_factory_and_leaves_openmp_alone(monkeypatch, tmp_path):
    """Workers inherit the environment uvicorn starts with. OpenMP's wait policy stays the runtime's own: idle
    torch threads that spin briefly answer MTCNN's many small parallel regions sooner (/verify p50 60 ms, against 81
    ms with OMP_WAIT_POLICY=PASSIVE, docs/BENCHMARKS.md section 3)."""
    # serve hands its settings to the workers through the environment: setenv first records each variable's
    # original state (absent included), so that the test leaves the environment as it found it
    for name in (*PASSED_ON, "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("VISAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VISAGE_API_KEYS", "test-key")
    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: seen.update(app=app, policy=os.getenv("OMP_WAIT_POLICY")))
    assert main(["serve", "--port", "8765"]) == 0
    assert seen == {"app": "app.main:create_app", "policy": None}


def test_serve_refuses_a_default_far_the_weights_have_no_threshold_for(monkeypatch, tmp_path, capsys):
    """It started, and /readyz said 503 for ever while /healthz said 200 (an orchestrator never restarted it)."""
    monkeypatch.setenv("VISAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VISAGE_API_KEYS", "test-key")
    monkeypatch.setenv("VISAGE_DEFAULT_FAR", "1e-5")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started"))
    assert main(["serve", "--port", "0"]) == 2  # (any free port: the address is checked first)
    assert "VISAGE_DEFAULT_FAR=1e-5 is not calibrated" in capsys.readouterr().err


@pytest.fixture
def serve_env(monkeypatch, tmp_path) -> Path:
    """A data folder for ``visage serve``, no configured key, uvicorn not started, and the environment restored
    afterwards (serve passes its settings on to the workers through it)."""
    for name in (*PASSED_ON, "VISAGE_API_KEYS", "VISAGE_LOG_FORMAT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("VISAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    return tmp_path


ISO_UTC_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_serve_with_json_logs_writes_its_start_up_lines_as_json_too(serve_env, monkeypatch, capsys):
    """The "API key ..." and "Visage on http://..." lines were plain text among the JSON objects."""
    monkeypatch.setenv("VISAGE_LOG_FORMAT", "json")
    assert main(["serve", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    assert [r["message"].split(" (")[0].rsplit(":", 1)[0] for r in records] == ["API key", "Visage on http://127.0.0.1"]
    port = int(records[1]["message"].split(" (")[0].rsplit(":", 1)[1])  # --port 0: the free port it chose, not 0
    assert port > 0 and os.environ["VISAGE_PORT"] == str(port)  # and the workers are told the same one
    for record in records:
        assert set(record) == {"time", "level", "logger", "pid", "request_id", "message"}
        assert record["level"] == "INFO" and record["logger"] == "visage.serve" and record["request_id"] == "-"
        assert re.fullmatch(ISO_UTC_MS, record["time"]), record["time"]
    assert err == ""


def test_serve_prints_a_generated_key_once_and_later_only_where_it_is(serve_env, capsys):
    """The key was printed on every start, so every journald / docker log of every restart held it."""
    assert main(["serve", "--port", "0"]) == 0
    first = capsys.readouterr().out
    key = (serve_env / "api_key").read_text().strip()
    assert f"API key (generated and stored in {serve_env / 'api_key'}; shown only this once): {key}" in first
    assert main(["serve", "--port", "0"]) == 0
    later = capsys.readouterr().out
    assert key not in later
    assert f"API key: stored in {serve_env / 'api_key'} (not printed: read it from that file)" in later


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_on_a_port_in_use_says_so_in_one_line_before_the_banner_the_key_and_the_model(
    serve_env, monkeypatch, capsys, log_format
):
    """It printed the banner, generated the key and loaded the model, then failed with uvicorn's "[Errno 98]
    address already in use" (exit 3)."""
    import socket

    monkeypatch.setenv("VISAGE_LOG_FORMAT", log_format)
    monkeypatch.setattr("model.bundle.load_bundle", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started"))
    with socket.socket() as other:  # another server, listening
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (serve_env / "api_key").exists()  # no banner, no key
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    message = json.loads(err)["message"] if log_format == "json" else err
    assert f"127.0.0.1:{port} is already in use" in message and "--port or VISAGE_PORT" in message
    if log_format == "json":
        assert json.loads(err)["level"] == "ERROR"
    else:
        assert err.startswith("visage serve: error: ")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_with_an_invalid_setting_says_so_in_one_line_in_the_log_format(
    serve_env, monkeypatch, capsys, log_format
):
    """With VISAGE_LOG_FORMAT=json a bad setting was still a plain line: a log collector that parses JSON dropped
    the one line saying why the service did not start."""
    monkeypatch.setenv("vIsAgE_LoG_FoRmAt", log_format)  # pydantic-settings reads names in any case; so must this
    monkeypatch.setenv("VISAGE_MAX_PIXELS", "lots")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started"))
    assert main(["serve", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    message = json.loads(err)["message"] if log_format == "json" else err
    assert "invalid settings" in message and "VISAGE_MAX_PIXELS='lots'" in message
    if log_format == "json":
        assert json.loads(err)["level"] == "ERROR" and json.loads(err)["logger"] == "visage.serve"


def test_serve_on_an_address_not_of_this_host_says_which_setting_to_change(serve_env, capsys):
    assert main(["serve", "--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1: never a local address
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1:0" in err and "--host / VISAGE_HOST" in err and len(err.splitlines()) == 1


def test_a_loaded_service_runs_numpy_blas_on_the_configured_threads(monkeypatch, tmp_path):
    """OpenBLAS's idle threads spin after each call and took a core from MTCNN (/verify p50 95-98 ms with two, 79-86
    ms with one, docs/BENCHMARKS.md section 3): the service sets numpy's and scipy's BLAS threads from
    VISAGE_BLAS_THREADS, 1 by default, and leaves FAISS's OpenMP threads (its OpenBLAS too) to VISAGE_FAISS_THREADS."""
    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    from app.runtime import open_service
    from app.settings import Settings

    def blas_threads(openmp: bool = False) -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and (lib.get("threading_layer") == "openmp") == openmp}

    faiss_before = faiss.omp_get_max_threads()
    try:
        with threadpool_limits(limits=2, user_api="blas"):  # restores the test process's own limits afterwards
            assert blas_threads() == {2}
            monkeypatch.setenv("VISAGE_BLAS_THREADS", "0")  # 0: leave them be
            open_service(Settings(data_dir=tmp_path / "a"), pipeline=fake_pipeline()).gallery.close()
            assert blas_threads() == {2}
            monkeypatch.delenv("VISAGE_BLAS_THREADS")
            monkeypatch.setenv("VISAGE_FAISS_THREADS", "2")
            open_service(Settings(data_dir=tmp_path / "b"), pipeline=fake_pipeline()).gallery.close()
            assert blas_threads() == {1}
            # FAISS's OpenBLAS is an OpenMP build: limiting it would set an OpenMP runtime's thread count
            assert blas_threads(openmp=True) == {2} and faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(faiss_before)


def test_reindex_of_a_folder_without_a_gallery_is_refused_and_creates_nothing(tmp_path, capsys):
    """A mistyped --data-dir must not quietly create an empty gallery and report "0 faces redone"."""
    missing = tmp_path / "typo"
    assert main(["reindex", "--data-dir", str(missing), "--json"]) == 2
    assert "no gallery at" in capsys.readouterr().err
    assert not missing.exists()


def test_a_bad_setting_is_one_line_naming_each_variable(monkeypatch, tmp_path, capsys):
    """pydantic's own report takes three lines a field with a web link; the command names the variables."""
    monkeypatch.setenv("VISAGE_PORT", "99999")
    monkeypatch.setenv("VISAGE_MAX_PIXELS", "lots")
    monkeypatch.setenv("VISAGE_LOG_LEVEL", "bogus")  # was uvicorn's KeyError traceback at start-up
    assert main(["serve", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "https://" not in err
    assert "VISAGE_PORT='99999': Input should be less than or equal to 65535" in err
    assert "VISAGE_MAX_PIXELS='lots': Input should be a valid integer" in err
    assert "VISAGE_LOG_LEVEL='bogus': Input should be 'critical', 'error'" in err
    monkeypatch.delenv("VISAGE_MAX_PIXELS")
    monkeypatch.delenv("VISAGE_LOG_LEVEL")
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "70000"]) == 2  # the option, not the variable
    assert "invalid settings: --port=70000: Input should be less than or equal to 65535" in capsys.readouterr().err


def test_a_damaged_gallery_database_is_one_line_and_json_says_why(tmp_path, capsys):
    """`visage enroll` on a data folder whose visage.db is not a database: was a sqlite3 traceback, no JSON."""
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    (tmp_path / "photos" / "alice" / "a.jpg").write_bytes(b"never read")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "visage.db").write_bytes(b"not a database " * 200)
    code = main(["enroll", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "data"), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert json.loads(out)["error"] == "store_unreadable" and "visage.db is not a usable SQLite database" in err


def test_an_unwritable_failures_path_is_refused_before_the_batch_runs(tmp_path, capsys):
    """The path was checked only for being a folder: a parent that is a file failed after the whole batch had
    run, and the report (which files failed) was lost."""
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    (tmp_path / "photos" / "alice" / "a.jpg").write_bytes(b"never read")
    (tmp_path / "a_file").write_text("")
    data = tmp_path / "data"
    argv = ["enroll", str(tmp_path / "photos"), "--data-dir", str(data), "--json", "--no-progress"]
    assert main([*argv, "--failures", str(tmp_path / "a_file" / "failures.csv")]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] in ("file_exists", "not_a_directory") and "--failures" in err
    assert "cannot write" in err and not data.exists()  # refused before the gallery was opened
    assert main([*argv, "--failures", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    argv[3] = str(tmp_path / "a_file")  # --data-dir a file: the failures list was blamed on --failures
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the failures list in the data folder (--data-dir / VISAGE_DATA_DIR)" in err and "--failures " not in err


def test_an_interrupted_batch_exits_130_and_still_reports_what_was_done(tmp_path, capsys, monkeypatch):
    """Ctrl-C stopped the batch with exit 0 (no failure row says "interrupted"): a script read it as done."""
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    (tmp_path / "photos" / "alice" / "a.jpg").write_bytes(b"never read")
    (tmp_path / "photos" / "alice" / "b.jpg").write_bytes(b"never read")
    failures = tmp_path / "failures.csv"

    def ctrl_c(path, max_bytes):
        raise KeyboardInterrupt

    monkeypatch.setattr("app.enroll.read_limited", ctrl_c)
    argv = ["enroll", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "data"), "--no-progress"]
    assert main([*argv, "--json", "--failures", str(failures)]) == 130
    report = json.loads(capsys.readouterr().out)
    assert report["aborted"] == "interrupted" and report["created"] == 0 and failures.is_file()
    # the image in hand may have been stored (with --url, its request may have reached the service): it was
    # counted "not attempted", though the gallery held it
    assert (report["files"], report["in_flight"], report["not_attempted"]) == (2, 1, 1)
    assert main(argv) == 130
    out, err = capsys.readouterr()
    assert "stopped early: interrupted. 1 of 2 images were not attempted" in err
    assert "in flight when stopped (may be stored)" in out


def test_a_batch_posted_to_a_service_lists_its_failures_where_it_was_run(tmp_path, capsys, monkeypatch):
    """With --url the list went to ./data/enroll_failures.csv, a local gallery folder the batch never used
    (created for it)."""
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    (tmp_path / "photos" / "alice" / "a.jpg").write_bytes(b"never read")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VISAGE_DATA_DIR", raising=False)
    monkeypatch.setattr("app.enroll.time.sleep", lambda s: None)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["enroll", "photos", "--url", url, "--api-key", "k", "--json", "--no-progress"]) == 2  # stopped
    report = json.loads(capsys.readouterr().out)
    assert report["aborted"].endswith(")") and "unreachable" in report["aborted"]
    assert report["failures_csv"] == "enroll_failures.csv" and (tmp_path / "enroll_failures.csv").is_file()
    assert not (tmp_path / "data").exists()
    monkeypatch.setenv("VISAGE_DATA_DIR", str(tmp_path / "named"))  # (the Docker image's /data)
    assert main(["enroll", "photos", "--url", url, "--api-key", "k", "--no-progress"]) == 2
    assert (tmp_path / "named" / "enroll_failures.csv").is_file()
    err = capsys.readouterr().err  # exit 2, not 1 ("some files failed"): nothing could be tried; said so
    assert "stopped early: the service at" in err and "Run the same command again (once that is fixed)" in err


def test_a_url_without_http_is_refused_at_once_not_retried_as_unreachable(tmp_path, capsys):
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    (tmp_path / "photos" / "alice" / "a.jpg").write_bytes(b"never read")
    argv = ["enroll", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "data"), "--json", "--no-progress"]
    for url in ("localhost:8000", "127.0.0.1:8000", "ftp://host", "http://[::1"):
        assert main([*argv, "--url", url, "--api-key", "k"]) == 2
        out, err = capsys.readouterr()
        assert json.loads(out)["error"] == "invalid_value" and url in err, err


def test_backup_command_writes_a_time_stamped_copy_and_never_overwrites(tmp_path, capsys):
    from app.store import Store, SubjectRef

    data, backups = tmp_path / "data", tmp_path / "backups"
    backups.mkdir()
    store = Store(data / "visage.db")
    store.add_face(SubjectRef(name="alice"), "sha-a", b"photo", np.ones(4, np.float32) / 2, "v1", (0, 0, 9, 9), 0.9)
    store.close()
    assert main(["backup", str(backups), "--data-dir", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subjects"] == out["faces"] == out["images"] == 1 and out["bytes"] > 0
    copy = Path(out["path"])
    assert copy.parent == backups and re.fullmatch(r"visage-\d{8}T\d{6}Z\.db", copy.name)
    assert Store(copy).subject(SubjectRef(name="alice")).face_count == 1
    assert main(["backup", str(copy), "--data-dir", str(data), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "file_exists"
    assert main(["backup", str(backups / "x.db"), "--data-dir", str(tmp_path / "typo")]) == 2
    assert "no gallery at" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    assert main(["backup", f"{tmp_path / 'nowhere'}/", "--data-dir", str(data)]) == 2  # a folder that is not there
    assert "no folder" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_backup_of_a_damaged_database_names_the_file(tmp_path, capsys):
    """It said only "database error: file is not a database"; enroll and reindex named the file."""
    (tmp_path / "visage.db").write_bytes(b"not a database at all, but long enough to be read " * 200)
    (tmp_path / "backups").mkdir()
    assert main(["backup", str(tmp_path / "backups"), "--data-dir", str(tmp_path), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "store_unreadable" and str(tmp_path / "visage.db") in out["detail"], out
    assert list((tmp_path / "backups").iterdir()) == []


def test_a_data_folder_under_a_file_says_which_file(tmp_path, capsys):
    """mkdir's own "[Errno 17] File exists: 'x'" did not say that x is a file where a folder should be."""
    (tmp_path / "notes.txt").write_text("a file")
    assert main(["reindex", "--data-dir", str(tmp_path / "notes.txt" / "data"), "--json"]) == 2
    from app.files import private_dir

    with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder"):
        private_dir(tmp_path / "notes.txt" / "data" / "deeper")


def test_serve_raises_the_open_file_limit_towards_the_hard_one(serve_env):
    """Each connection is a file: 250 idle ones (uvicorn has no timeout before a first request) used up a soft
    limit of 256, and /healthz stopped answering. serve widens the margin before uvicorn starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        assert main(["serve", "--port", "0"]) == 0
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == (65536 if hard == resource.RLIM_INFINITY else min(65536, hard))  # (= low if hard is low)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_batch_writers_refuse_a_model_other_than_the_services(monkeypatch, tmp_path, capsys):
    """`VISAGE_FLIP=false visage enroll` beside a default service re-embedded acknowledged faces under a version that
    service does not search (its /verify then said 409 no_current_faces), and `reindex` from a shell without the
    service's settings emptied its index; both reported success."""
    import shutil

    from conftest import photo

    from app.runtime import open_service
    from app.settings import Settings

    data = tmp_path / "data"
    service = open_service(Settings(data_dir=data))  # a service opens the gallery: its version is recorded
    served = service.model_version
    service.gallery.close()
    (tmp_path / "batch" / "obama").mkdir(parents=True)
    shutil.copy(photo("obama.jpg"), tmp_path / "batch" / "obama")
    monkeypatch.setenv("VISAGE_FLIP", "false")  # the shell lacks the service's settings
    for args in (["enroll", str(tmp_path / "batch")], ["reindex"]):
        assert main([*args, "--data-dir", str(data), "--no-progress", "--json"]) == 2
        out = json.loads(capsys.readouterr().out)
        assert out["error"] == "model_mismatch" and served in out["detail"] and "--new-model" in out["detail"]
    store_service = open_service(Settings(data_dir=data, flip=False), with_index=False)
    assert store_service.gallery.store.counts(served)["faces"] == 0  # nothing was written
    store_service.gallery.close()
    # moving the gallery on purpose, then back with the service's own settings
    assert main(["enroll", str(tmp_path / "batch"), "--data-dir", str(data), "--no-progress", "--new-model"]) == 0
    capsys.readouterr()
    monkeypatch.delenv("VISAGE_FLIP")
    assert main(["reindex", "--data-dir", str(data), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["redone"] == 1
