"""End to end: a real uvicorn subprocess on a free 127.0.0.1 port, the shipped weights (or $VISAGE_WEIGHTS) and
the real photos in ../shared/data/photos. The tests of this module share one server and run in order."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from app_helpers import REPO, Server, post_image
from conftest import PHOTOS, photo
from PIL import Image

from app.index import FaceIndex, IndexConfig
from app.store import Store, SubjectRef
from model.bundle import load_bundle

BUNDLE = load_bundle()  # the shipped weights the server runs

pytestmark = pytest.mark.slow
KEY = "e2e-key"
MAX_UPLOAD = 3_000_000  # bytes per image (the photos are under 600 kB); the request limit is 2x + 1 MiB
TIMINGS: dict[str, list[float]] = {}


def read(rel: str) -> bytes:
    return photo(rel).read_bytes()


def timed(name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    TIMINGS.setdefault(name, []).append(time.perf_counter() - start)
    return result


def is_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"], body


def visage(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.console", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "VISAGE_LOG_LEVEL": "warning"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"VISAGE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}
    srv = Server(tmp_path_factory.mktemp("e2e") / "data", api_key=KEY, env=env).start()
    yield srv
    srv.stop()
    if TIMINGS:
        summary = {k: [round(v, 3) for v in vals] for k, vals in TIMINGS.items()}
        print("\nlatency (s):", json.dumps(summary))


@pytest.fixture(scope="module")
def api(server):
    with server.client() as client:
        yield client


def subject_id(api: httpx.Client, name: str) -> int:
    items = api.get("/subjects", params={"name": name}).json()["items"]
    return next(s["id"] for s in items if s["name"] == name)


def test_enroll_then_verify_obama_and_not_biden(api):
    r = post_image(api, "/enroll", read("obama.jpg"), subject="obama")
    assert r.status_code == 201, r.text
    assert r.json()["created"] and r.json()["quality"] > 0.9
    again = post_image(api, "/enroll", read("obama.jpg"), subject="obama")
    assert again.status_code == 200 and again.json()["face_id"] == r.json()["face_id"]
    results = {}
    for rel in ["obama2.jpg", "obama3.jpg", "obama4.jpg", "biden.jpg", "biden2.jpg"]:
        res = timed("verify", post_image, api, "/verify", read(rel), subject="obama")
        assert res.status_code == 200, res.text
        results[rel] = res.json()
    summary = {k: (v["match"], v["similarity"], v["threshold"]) for k, v in results.items()}
    # At the calibrated default (FAR 1e-3) Biden is refused and Obama's three other photos are accepted (the
    # narrowest, obama3.jpg, by 0.039: model/MODEL_CARD.md) ...
    assert not results["biden.jpg"]["match"] and not results["biden2.jpg"]["match"], summary
    assert all(results[f"obama{i}.jpg"]["match"] for i in (2, 3, 4)), summary
    assert results["biden.jpg"]["threshold"] == BUNDLE.threshold("1e-3"), summary
    # ... and every Obama photo is closer to the enrolled Obama than either Biden photo.
    obama = [results[f"obama{i}.jpg"]["similarity"] for i in (2, 3, 4)]
    assert min(obama) > max(results["biden.jpg"]["similarity"], results["biden2.jpg"]["similarity"]), summary
    # The looser FAR 1e-2, asked for per request, still refuses both photos of Biden (biden.jpg by 0.021: the
    # shipped model is at 95.0 % on held-out LFW folds, not the 97 % target).
    for rel, expected in [("obama2.jpg", True), ("obama3.jpg", True), ("obama4.jpg", True), ("biden.jpg", False),
                          ("biden2.jpg", False)]:
        res = post_image(api, "/verify", read(rel), subject="obama", far="1e-2")
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["threshold"] == round(BUNDLE.threshold("1e-2"), 4) and body["far"] == "1e-2", body
        assert body["match"] is expected, (rel, body)


def test_identify_both_in_the_group_photo(api):
    assert post_image(api, "/enroll", read("biden.jpg"), subject="biden").status_code == 201
    # a second photo of Obama: identify ranks subjects by their best face (the test also covers a subject with
    # several faces). With the shipped weights the two faces of this group photo score 0.194 (Obama) and 0.041
    # (Biden) against the enrolled ones: both over the default FAR 1e-3 threshold (0.0352), which this uses.
    assert post_image(api, "/enroll", read("obama4.jpg"), subject="obama").status_code == 201
    r = timed("identify", post_image, api, "/identify", read("multi/obama_and_biden.jpg"), k=2)
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    assert len(faces) >= 2
    seen = [(f["face"]["box"], f["best"]["name"] if f["match"] else None, f["candidates"]) for f in faces]
    # the two largest faces: Biden on the left, Obama on the right (boxes are left, top, right, bottom)
    left, right = sorted(faces[:2], key=lambda f: f["face"]["box"][0])
    assert left["candidates"][0]["name"] == "biden" and right["candidates"][0]["name"] == "obama", seen
    assert left["match"] and right["match"], seen
    assert not any(f["match"] for f in faces[2:]), seen  # the child in the corner is neither


def test_every_bad_input_gets_a_4xx_json_error(server, api):
    pcx, thin = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64)).save(pcx, "PCX")
    Image.new("RGB", (1280, 19)).save(thin, "PNG")  # too small for any face MTCNN looks for
    cases = [
        (post_image(api, "/identify", thin.getvalue()), 422, "no_face_found"),
        (post_image(api, "/enroll", read("edge/bad/truncated.jpg"), subject="x"), 400, "unreadable_image"),
        (post_image(api, "/enroll", read("edge/bad/not_an_image.jpg"), subject="x"), 400, "unreadable_image"),
        (post_image(api, "/enroll", read("edge/bad/empty.jpg"), subject="x"), 400, "empty_image"),
        (post_image(api, "/enroll", read("edge/bad/bomb_20000x20000.png"), subject="x"), 413, "image_too_large"),
        (post_image(api, "/verify", read("edge/bad/bomb_20000x20000.png"), subject="obama"), 413,
         "image_too_large"),
        (post_image(api, "/enroll", pcx.getvalue(), subject="x"), 415, "unsupported_image_type"),
        (post_image(api, "/enroll", read("nonface/coffee.jpg"), subject="x"), 422, "no_face_found"),
        (post_image(api, "/identify", read("nonface/chelsea_cat.jpg")), 422, "no_face_found"),
        (post_image(api, "/enroll", read("multi/two_people.jpg"), subject="x"), 422, "multiple_faces"),
        (post_image(api, "/verify", read("obama2.jpg"), subject="nobody"), 404, "subject_not_found"),
        (post_image(api, "/verify", read("obama2.jpg"), subject="obama", threshold=2.5), 422, "bad_parameter"),
        (post_image(api, "/verify", read("obama2.jpg"), subject="obama", far="0.3"), 422, "bad_parameter"),
        (post_image(api, "/enroll", read("obama2.jpg"), subject="x", face="1,2"), 422, "bad_parameter"),
        (api.post("/enroll", data={"subject": "x"}), 422, "bad_parameter"),
        (post_image(api, "/embed", b"\xff" * (MAX_UPLOAD + 1)), 413, "image_too_large"),
        (api.post("/embed", content=b"x" * (2 * MAX_UPLOAD + 2 * 1024 * 1024),
                  headers={"content-type": "multipart/form-data; boundary=b"}), 413, "request_too_large"),
        (api.get("/subjects/99999"), 404, "subject_not_found"),
        (api.get("/nope"), 404, "not_found"),
        (api.delete("/enroll"), 405, "method_not_allowed"),
    ]
    for response, status, code in cases:
        is_error(response, status, code)
    with server.client(key=None) as anonymous:
        is_error(post_image(anonymous, "/verify", read("obama2.jpg"), subject="obama"), 401, "unauthorized")
        is_error(anonymous.get("/subjects"), 401, "unauthorized")
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
    with server.client(key="wrong") as wrong:
        is_error(wrong.get("/subjects"), 401, "unauthorized")
    assert api.get("/subjects", params={"name": "x"}).json()["total"] == 0  # nothing was stored


def self_score(client: httpx.Client, data: bytes) -> float:
    """A photo's score against itself: 1 minus its cohort offset (model/score_norm.py), not 1 as for a cosine."""
    return client.post("/compare", files={"image1": data, "image2": data}).json()["similarity"]


def test_batch_enroll_while_serving_then_through_the_api(server, api, tmp_path):
    batch = tmp_path / "batch"
    for rel, subject in [("obama2.jpg", "obama"), ("obama3.jpg", "obama"), ("biden2.jpg", "biden"),
                         ("multi/two_people.jpg", "pair"), ("edge/bad/not_an_image.jpg", "junk")]:
        (batch / subject).mkdir(parents=True, exist_ok=True)
        (batch / subject / Path(rel).name).write_bytes(read(rel))
    failures = tmp_path / "failures.csv"
    # 1. another process writes into the store the service is using
    local = visage("enroll", str(batch), "--data-dir", str(server.data_dir), "--failures", str(failures),
                   "--json", "--no-progress")
    assert local.returncode == 1, local.stderr  # 1: some files failed
    report = json.loads(local.stdout)
    assert (report["created"], report["existing"], report["failed"]) == (3, 0, 2), report
    rows = list(csv.DictReader(failures.open()))
    assert {(Path(r["file"]).name, r["subject"], r["error"]) for r in rows} == {
        ("two_people.jpg", "pair", "multiple_faces"), ("not_an_image.jpg", "junk", "unreadable_image")}
    # the service sees the new faces without a restart: obama3.jpg is now in the gallery itself
    obama = api.get(f"/subjects/{subject_id(api, 'obama')}").json()
    assert obama["face_count"] == 4  # obama.jpg and obama4.jpg through the API, obama2/3 by the batch
    hit = post_image(api, "/identify", read("obama3.jpg"), k=1).json()["faces"][0]["candidates"][0]
    assert hit["name"] == "obama" and hit["similarity"] == pytest.approx(self_score(api, read("obama3.jpg")), abs=2e-4)
    assert hit["face_id"] in {f["id"] for f in obama["faces"]}
    # 2. the same folder through the API: nothing new (idempotent), and --face largest takes the collage
    remote = visage("enroll", str(batch), "--url", server.url, "--api-key", KEY, "--failures", str(failures),
                    "--face", "largest", "--json", "--no-progress")
    report = json.loads(remote.stdout)
    assert (report["created"], report["existing"], report["failed"]) == (1, 3, 1), (report, remote.stderr)
    assert [r["error"] for r in csv.DictReader(failures.open())] == ["unreadable_image"]
    bad_key = visage("enroll", str(batch), "--url", server.url, "--api-key", "nope", "--json", "--no-progress",
                     "--failures", str(failures))
    assert bad_key.returncode == 2 and "refused the API key" in json.loads(bad_key.stdout)["aborted"]


def test_reindex_redoes_old_version_faces_and_reports_the_rest(server, api):
    ready = api.get("/readyz").json()
    biden = api.get(f"/subjects/{subject_id(api, 'biden')}").json()
    redo, lost = biden["faces"][0], biden["faces"][1]
    conn = sqlite3.connect(server.data_dir / "visage.db")
    with conn:  # as if both faces had been enrolled by an older model, and one original was never kept
        conn.execute("UPDATE faces SET model_version = 'old-model' WHERE id IN (?, ?)", (redo["id"], lost["id"]))
        conn.execute("DELETE FROM blobs WHERE sha256 = ?", (lost["image_sha256"],))
    conn.close()
    stale = api.get("/readyz").json()
    assert stale["stale_faces"] == 2 and stale["indexed_faces"] == ready["indexed_faces"] - 2
    out = visage("reindex", "--data-dir", str(server.data_dir), "--json", "--no-progress")
    assert out.returncode == 1, out.stderr  # 1: some faces could not be redone
    report = json.loads(out.stdout)
    assert report["redone"] == 1 and [f["face_id"] for f in report["failed"]] == [lost["id"]]
    assert report["failed"][0]["error"] == "image_not_stored"
    after = api.get("/readyz").json()
    assert after["stale_faces"] == 1 and after["indexed_faces"] == ready["indexed_faces"] - 1
    r = post_image(api, "/verify", read("biden.jpg"), subject="biden").json()
    assert r["matched_face_id"] == redo["id"]
    assert r["similarity"] == pytest.approx(self_score(api, read("biden.jpg")), abs=2e-4)


def _sent_then_hung_up(server, path: str, image: bytes) -> None:
    """A whole request sent on a raw socket, then the connection closed without reading the answer (a client
    whose timeout passed)."""
    request = httpx.Request("POST", f"{server.url}{path}", headers={"X-API-Key": KEY},
                            files={"image": ("face.jpg", image, "image/jpeg")})
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + request.read())
        time.sleep(0.3)  # read, admitted and queued behind the busy requests


def test_a_request_whose_client_hung_up_is_dropped_before_the_model_runs(server, api):
    """Under load, clients that time out hang up and send again: their queued work ran anyway, each a detection
    and an embedding nobody would read, while the live requests timed out behind them."""
    def dropped() -> float:
        text = api.get("/metrics").text
        line = next((x for x in text.splitlines()
                     if x.startswith("visage_http_requests_total{") and 'route="/embed"' in x and 'status="499"' in x),
                    "x 0")
        return float(line.split()[-1])

    before = dropped()
    big = read("edge/obama_4000px.jpg")
    with server.client() as busy:
        # one inference thread (the default): the first runs, eleven queue (~0.3 s each here, alone)
        threads = [threading.Thread(target=post_image, args=(busy, "/embed", big)) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        _sent_then_hung_up(server, "/embed", read("obama.jpg"))
        for t in threads:
            t.join()
    deadline = time.monotonic() + 10
    while dropped() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dropped() == before + 1
    assert post_image(api, "/embed", read("obama.jpg")).status_code == 200  # nothing stuck behind it


def test_restart_finds_the_gallery_intact(server, api):
    before = api.get("/subjects").json()
    faces = {s["id"]: api.get(f"/subjects/{s['id']}").json()["faces"] for s in before["items"]}
    server.stop()
    server.start()
    with server.client() as fresh:
        ready = fresh.get("/readyz").json()
        assert ready["index_state"] == "loaded", ready  # saved at shutdown, agrees with the store
        assert ready["scoring"] == BUNDLE.scorer.tag and ready["scoring"].startswith("cohort4096k16")
        assert fresh.get("/subjects").json() == before
        assert {s: fresh.get(f"/subjects/{s}").json()["faces"] for s in faces} == faces
        r = post_image(fresh, "/verify", read("obama4.jpg"), subject="obama").json()
        assert r["match"], r


def test_backup_while_serving_then_restore_once_stopped(server, tmp_path):
    with server.client() as api:  # (a restart may have moved the server to another port)
        before = api.get("/subjects").json()
        out = visage("backup", f"{tmp_path}/", "--data-dir", str(server.data_dir), "--json")
        assert out.returncode == 0, out.stderr
        copy = Path(json.loads(out.stdout)["path"])
        assert copy.parent == tmp_path and json.loads(out.stdout)["subjects"] == before["total"]
        created = post_image(api, "/enroll", read("obama2.jpg"), subject="after-the-backup")
        assert created.status_code == 201
        refused = visage("restore", str(copy), "--data-dir", str(server.data_dir), "--json")
        assert refused.returncode == 2 and json.loads(refused.stdout)["error"] == "gallery_in_use", refused.stdout
        assert api.get("/subjects").json()["total"] == before["total"] + 1  # the service went on untouched
    server.stop()
    out = visage("restore", str(copy), "--data-dir", str(server.data_dir), "--json")
    assert out.returncode == 0, out.stderr
    replaced = Path(json.loads(out.stdout)["replaced"])
    server.start()
    with server.client() as fresh:
        ready = fresh.get("/readyz").json()
        assert ready["index_state"].startswith("rebuilt"), ready  # the saved index was built from another database
        assert fresh.get("/subjects").json() == before
        assert post_image(fresh, "/verify", read("obama4.jpg"), subject="obama").json()["match"]
    kept = Store(replaced)  # the face enrolled after the backup is not lost: it is in the file kept aside
    try:
        assert kept.subject(SubjectRef(name="after-the-backup")).face_count == 1
    finally:
        kept.close()


def test_kill_9_during_concurrent_enrollment_loses_no_acknowledged_face(tmp_path):
    """``visage serve`` with no key configured (it generates and prints one); three clients enroll at once;
    kill -9 mid-stream; after a restart every acknowledged face is there and store and index agree."""
    yale = PHOTOS.parent / "yale" / "images"
    images = sorted(yale.glob("subject*/*.jpg"))[:30]
    assert len(images) == 30
    srv = Server(tmp_path / "data", api_key=None, cli=True).start()
    key = srv.api_key
    assert key and (tmp_path / "data" / "api_key").read_text().strip() == key
    acknowledged: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def client_thread(share: list[Path]) -> None:
        with srv.client() as c:
            for path in share:
                try:
                    r = post_image(c, "/enroll", path.read_bytes(), subject=path.parent.name)
                except httpx.TransportError:
                    return
                if r.status_code == 201:
                    with lock:
                        acknowledged.append((r.json()["subject"]["id"], r.json()["face_id"], str(path)))

    threads = [threading.Thread(target=client_thread, args=(images[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.kill()
    for t in threads:
        t.join()
    assert len(acknowledged) >= 8
    srv.start()
    try:
        # the generated key is stable across restarts (the requests below use it) and printed only once
        assert srv.log.read_text().count(key) == 1 and "(not printed: read it from that file)" in srv.log.read_text()
        with srv.client() as c:
            ready = c.get("/readyz").json()
            assert ready["current_faces"] == ready["indexed_faces"] >= len(acknowledged), ready
            for sid, face_id, _ in acknowledged:
                assert face_id in [f["id"] for f in c.get(f"/subjects/{sid}").json()["faces"]]
            sid, face_id, path = acknowledged[-1]
            hit = post_image(c, "/identify", Path(path).read_bytes(), k=1).json()["faces"][0]["candidates"][0]
            assert hit["face_id"] == face_id
            assert hit["similarity"] == pytest.approx(self_score(c, Path(path).read_bytes()), abs=2e-4)
    finally:
        srv.stop()
    # after a clean stop, the saved index holds exactly the store's faces, and every face has its image
    store = Store(tmp_path / "data" / "visage.db")
    index = FaceIndex.load(tmp_path / "data" / "index.faiss", IndexConfig())
    # the index file names the model and its scoring rule, and holds one extra column (the cohort offset)
    assert index.model_version == f"{BUNDLE.model_version}|{BUNDLE.scorer.tag}" and index.dim == 129
    generation, ids = store.current_ids(BUNDLE.model_version, BUNDLE.config.embedding_dim)
    assert list(index.ids()) == list(ids) and index.generation == generation
    total, subjects = store.list_subjects(limit=500)
    for s in subjects:
        assert all(f.has_image for f in store.subject_faces(s.id))
    store.close()


def test_json_logs_key_every_request_line_by_its_request_id(tmp_path):
    """``visage serve`` with VISAGE_LOG_FORMAT=json: each log line is one JSON object, and a failed request's
    access line carries the X-Request-ID its client sent (start-up lines, outside any request, carry "-")."""
    env = {"VISAGE_LOG_LEVEL": "info", "VISAGE_LOG_FORMAT": "json"}
    srv = Server(tmp_path / "data", env=env, cli=True).start()
    try:
        with srv.client() as c:
            r = post_image(c, "/verify", read("obama.jpg"), subject="nobody")
            refused = c.post("/embed", files={"image": ("x.jpg", b"not an image")},
                             headers={"X-Request-ID": "support-ticket-17"})
    finally:
        srv.stop()
    is_error(r, 404, "subject_not_found")
    is_error(refused, 400, "unreadable_image")
    assert refused.headers["x-request-id"] == "support-ticket-17"
    lines = [line for line in srv.log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "pid", "request_id", "message"} <= set(records[0])
    access = [rec for rec in records if rec["logger"] == "uvicorn.access"]
    mine = [rec for rec in access if rec["request_id"] == "support-ticket-17"]
    assert len(mine) == 1 and "POST /embed" in mine[0]["message"] and "400" in mine[0]["message"]
    assert any(rec["request_id"] == r.headers["x-request-id"] for rec in access)
    assert any(rec["logger"] == "visage.runtime" and rec["request_id"] == "-" for rec in records)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """``visage serve --workers 2``, then kill -9 of the supervisor (uvicorn's): the workers went on serving,
    unsupervised and holding the port, and the next ``visage serve`` failed with "already in use"."""
    srv = Server(tmp_path / "data", env={"VISAGE_WORKERS": "2"}, cli=True).start(timeout=240)
    workers = [p for p in _children(srv.proc.pid)
               if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert len(workers) == 2, workers
    srv.kill()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    for p in alive:  # (leave nothing behind if the test fails)
        os.kill(p, 9)
    assert not alive, "workers outlived their supervisor"
    srv.start(timeout=240)  # the port is free again
    srv.stop()
