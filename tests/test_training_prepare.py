"""training.prepare: a folder-per-identity photo set -> aligned 112x112 crops + a manifest, resumable."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from model.align import ARCFACE_TEMPLATE
from model.decode import IMAGE_SUFFIXES, decode_image
from model.detect import FaceDetector
from model.processes import interrupts_deferred
from training.paths import shared_data
from training.prepare import MANIFEST, list_images, prepare, read_manifest

LFW = shared_data() / "lfw" / "images"
PEOPLE = ["Colin_Powell", "Joseph_Biden", "Serena_Williams"]


def build_source(root: Path) -> Path:
    """Two LFW images of each of three people, a corrupt file, a photo without a face, and files to ignore."""
    src = root / "src"
    for name in PEOPLE:
        (src / name).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(LFW / name / f"{name}_{i:04d}.jpg", src / name)
    (src / "Joseph_Biden" / "Joseph_Biden_9999.jpg").write_bytes(b"this is not a jpeg")
    (src / "Coffee_Cup").mkdir()
    shutil.copy(photo("nonface/coffee.jpg"), src / "Coffee_Cup" / "Coffee_Cup_0001.jpg")
    (src / "Colin_Powell" / "notes.txt").write_text("not an image")
    shutil.copy(
        LFW / "Colin_Powell" / "Colin_Powell_0003.jpg", src / "stray.jpg"
    )  # not in an identity folder
    return src


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    src, dst = build_source(root), root / "dst"
    summary = prepare(src, dst, workers=1, progress=False)
    return src, dst, summary


def test_list_images_walks_identity_folders_only(prepared):
    src, _, _ = prepared
    items = list_images(src)
    assert items == sorted(items)
    assert {ident for ident, _ in items} == {*PEOPLE, "Coffee_Cup"}
    assert len(items) == 8
    assert all(not rel.endswith(".txt") and rel != "stray.jpg" for _, rel in items)


def test_every_image_is_in_the_manifest_exactly_once(prepared):
    src, dst, summary = prepared
    rows = read_manifest(dst)
    assert sorted(r.source for r in rows) == sorted(rel for _, rel in list_images(src))
    assert (summary.total, summary.done_before, summary.detected, summary.fallback, summary.failed,
            summary.failed_now) == (8, 0, 6, 1, 1, 1)
    assert summary.manifest == str(dst / MANIFEST)
    for r in rows:
        assert r.identity == r.source.split("/")[0]
        assert r.sha256 == hashlib.sha256((src / r.source).read_bytes()).hexdigest()


def test_failed_and_fallback_rows_say_why(prepared):
    _, dst, _ = prepared
    rows = {r.source: r for r in read_manifest(dst)}
    failed = rows["Joseph_Biden/Joseph_Biden_9999.jpg"]
    assert failed.status == "failed" and failed.crop == "" and "not an image" in failed.reason
    fallback = rows["Coffee_Cup/Coffee_Cup_0001.jpg"]
    assert fallback.status == "fallback" and fallback.score == 0.0 and "no face" in fallback.reason
    assert (dst / fallback.crop).is_file()  # the centred region is still cropped and counted
    for name in PEOPLE:
        for i in (1, 2):
            row = rows[f"{name}/{name}_{i:04d}.jpg"]
            assert row.status == "detected" and row.score >= 0.95 and row.reason == ""
            assert row.crop == f"crops/{name}/{name}_{i:04d}.jpg.png"


def test_photos_that_differ_only_in_suffix_get_their_own_crops(tmp_path):
    """x.jpg and x.png in one folder once wrote one crop file, and a manifest row then named the other's face."""
    src = tmp_path / "src" / "P"
    src.mkdir(parents=True)
    shutil.copy(LFW / "Colin_Powell" / "Colin_Powell_0001.jpg", src / "x.jpg")
    Image.open(LFW / "Serena_Williams" / "Serena_Williams_0001.jpg").save(src / "x.png")
    prepare(tmp_path / "src", tmp_path / "dst", workers=1, progress=False)
    rows = {r.source: r for r in read_manifest(tmp_path / "dst")}
    crops = {rel: np.asarray(Image.open(tmp_path / "dst" / rows[rel].crop)) for rel in ("P/x.jpg", "P/x.png")}
    assert rows["P/x.jpg"].crop != rows["P/x.png"].crop
    assert np.abs(crops["P/x.jpg"].astype(int) - crops["P/x.png"].astype(int)).mean() > 10  # two faces


def test_crops_are_aligned_112px_faces(prepared):
    _, dst, _ = prepared
    detector = FaceDetector()
    for row in read_manifest(dst):
        if row.status == "failed":
            continue
        crop = Image.open(dst / row.crop)
        assert crop.mode == "RGB" and crop.size == (112, 112)
        if row.status != "detected":
            continue
        canvas = Image.new("RGB", (176, 176), (128, 128, 128))
        canvas.paste(crop, (32, 32))
        faces = detector.detect(canvas)
        assert len(faces) == 1, row.source
        eyes = faces[0].landmarks[:2] - 32
        assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 5.0, row.source


def test_rerunning_processes_nothing_new(prepared):
    src, dst, first = prepared
    manifest_before = (dst / MANIFEST).read_bytes()
    again = prepare(src, dst, workers=1, progress=False)
    assert (again.total, again.done_before) == (8, 8)
    assert (again.detected, again.fallback, again.failed) == (first.detected, first.fallback, first.failed)
    assert (dst / MANIFEST).read_bytes() == manifest_before


@pytest.fixture(scope="module")
def resumed(prepared, tmp_path_factory):
    """A copy of the prepared set with one new source image and one crop file lost, prepared again."""
    src, dst, _ = prepared
    root = tmp_path_factory.mktemp("resume")
    src2, dst2 = root / "src", root / "dst"
    shutil.copytree(src, src2)
    shutil.copytree(dst, dst2)
    shutil.copy(LFW / "Serena_Williams" / "Serena_Williams_0003.jpg", src2 / "Serena_Williams")
    (dst2 / "crops" / "Colin_Powell" / "Colin_Powell_0001.jpg.png").unlink()
    return src2, dst2, prepare(src2, dst2, workers=1, progress=False)


def test_new_images_and_lost_crops_are_picked_up(resumed):
    _, dst, summary = resumed
    assert (summary.total, summary.done_before, summary.detected) == (9, 7, 7)
    assert (dst / "crops" / "Serena_Williams" / "Serena_Williams_0003.jpg.png").is_file()
    assert (dst / "crops" / "Colin_Powell" / "Colin_Powell_0001.jpg.png").is_file()


def test_resuming_keeps_one_manifest_row_per_image(resumed):
    """The module's promise: every source image is in the manifest exactly once. Redoing a lost crop appends
    a second row for the same image, and training.data.load_prepared (which reads every row) then loads it
    twice."""
    _, dst, _ = resumed
    sources = [r.source for r in read_manifest(dst)]
    assert sorted(sources) == sorted(set(sources))


def test_a_changed_image_is_redone_and_a_repaired_one_retried(prepared, tmp_path):
    """Rows were reused by path alone: `visage eval`'s cache scored a replaced photo as the old one, and a
    repaired file stayed "failed" for good. Now a file whose hash differs from its row's is redone."""
    src, dst, _ = prepared
    src2, dst2 = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(src, src2)
    shutil.copytree(dst, dst2)
    replaced, repaired = "Colin_Powell/Colin_Powell_0001.jpg", "Joseph_Biden/Joseph_Biden_9999.jpg"
    old_crop = (dst2 / "crops" / "Colin_Powell" / "Colin_Powell_0001.jpg.png").read_bytes()
    shutil.copy(LFW / "Serena_Williams" / "Serena_Williams_0003.jpg", src2 / replaced)  # another face, same name
    shutil.copy(LFW / "Joseph_Biden" / "Joseph_Biden_0003.jpg", src2 / repaired)
    again = prepare(src2, dst2, workers=1, progress=False)
    assert (again.total, again.done_before, again.changed, again.failed, again.failed_now) == (8, 6, 2, 0, 0)
    rows = {r.source: r for r in read_manifest(dst2)}
    for rel in (replaced, repaired):
        assert rows[rel].sha256 == hashlib.sha256((src2 / rel).read_bytes()).hexdigest()
        assert rows[rel].status == "detected"
    assert (dst2 / rows[replaced].crop).read_bytes() != old_crop
    assert prepare(src2, dst2, workers=1, progress=False).changed == 0  # and nothing again once redone


def test_missing_source_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare(tmp_path / "nope", tmp_path / "dst", workers=1, progress=False)


def test_a_source_without_images_is_an_error_not_zero_successes(tmp_path):
    (tmp_path / "src" / "someone").mkdir(parents=True)
    (tmp_path / "src" / "someone" / "notes.txt").write_text("no photos here")
    with pytest.raises(FileNotFoundError, match="no images in"):
        prepare(tmp_path / "src", tmp_path / "dst", workers=1, progress=False)
    assert not (tmp_path / "dst").exists()


def test_adding_to_a_folder_with_another_pad_is_refused(prepared):
    """The old crops were kept and new ones made with the other framing, silently."""
    src, dst, _ = prepared
    manifest_before = (dst / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="--pad 0.28"):
        prepare(src, dst, workers=1, pad=0.1, progress=False)
    assert (dst / MANIFEST).read_bytes() == manifest_before


@pytest.mark.parametrize("suffix", sorted(IMAGE_SUFFIXES))
def test_every_listed_suffix_can_be_decoded(suffix):
    """prepare lists files by suffix, then decodes them with model.decode: a suffix it lists but the decoder
    refuses turns every such image into a 'failed' row."""
    face = Image.open(LFW / "Colin_Powell" / "Colin_Powell_0001.jpg").convert("RGB")
    if suffix == ".pgm":
        face = face.convert("L")
    fmt = Image.registered_extensions()[suffix]
    buf = io.BytesIO()
    face.save(buf, fmt)
    assert decode_image(buf.getvalue()).size == face.size


def test_landmarks_are_recorded_in_source_pixels(prepared):
    """Aligning the source photo (on prepare's grey canvas) by the manifest's landmarks reproduces the crop:
    training can re-warp the source exactly as the crop was made (training/views.py)."""
    from model.align import align_face
    from training.prepare import _pad

    src, dst, _ = prepared
    for row in read_manifest(dst):
        if row.status == "failed":
            assert row.landmarks == ""
            continue
        points = np.array([float(v) for v in row.landmarks.split()]).reshape(5, 2)
        canvas, ox, oy = _pad(decode_image((src / row.source).read_bytes()), 0.28)
        again = align_face(canvas, points + [ox, oy]).astype(np.float32)
        crop = np.asarray(Image.open(dst / row.crop), dtype=np.float32)
        assert np.abs(again - crop).mean() < 1.0, row.source  # landmarks are stored to 0.01 px


def test_a_manifest_from_before_landmarks_is_upgraded_in_place(prepared, tmp_path):
    src, dst, _ = prepared
    old = tmp_path / "old"
    shutil.copytree(dst, old)
    lines = (old / MANIFEST).read_text().splitlines()
    (old / MANIFEST).write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    again = prepare(src, old, workers=1, progress=False)
    assert again.done_before == 8  # nothing redone
    assert (old / MANIFEST).read_text().splitlines()[0].endswith(",landmarks")
    assert all(r.landmarks == "" for r in read_manifest(old))


def test_a_row_torn_by_a_crash_is_redone_and_a_foreign_or_damaged_manifest_is_named(prepared, tmp_path):
    """The next run appended onto a torn last row (TypeError in every later prepare, eval and train); a folder
    holding someone else's manifest.csv was a KeyError traceback."""
    src, dst, _ = prepared
    torn = tmp_path / "torn"
    shutil.copytree(dst, torn)
    raw = (torn / MANIFEST).read_bytes()
    (torn / MANIFEST).write_bytes(raw[:-60])  # the last row cut short, without its newline
    again = prepare(src, torn, workers=1, progress=False)
    assert again.total == 8 and again.done_before == 7 and again.failed_now == 0  # the torn row's image redone
    assert sorted(r.source for r in read_manifest(torn)) == sorted(r.source for r in read_manifest(dst))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST).write_text("file,label\na.jpg,1\n")
    with pytest.raises(ValueError, match="is not a manifest written by `visage prepare` .*file, label"):
        prepare(src, foreign, workers=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / MANIFEST).write_bytes(b"")  # a first run killed before its first row: carried on from, not refused
    assert read_manifest(empty) == []
    damaged = tmp_path / "damaged"
    shutil.copytree(dst, damaged)
    lines = (damaged / MANIFEST).read_text().splitlines()
    lines[3] = lines[3] + ",extra,fields"
    (damaged / MANIFEST).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest.csv, line 4, is damaged \(wrong number of fields\)"):
        read_manifest(damaged)


def test_a_destination_inside_the_source_is_refused(tmp_path):
    """Its crops became photos of a new identity (named after the folder) on the next run."""
    (tmp_path / "src" / "someone").mkdir(parents=True)
    for dst in (tmp_path / "src" / "out", tmp_path / "src"):
        with pytest.raises(ValueError, match="is inside the source"):
            prepare(tmp_path / "src", dst, workers=1, progress=False)
    assert not (tmp_path / "src" / "out").exists()


@pytest.mark.parametrize("pad", [-0.1, 1.5, float("nan")])
def test_a_pad_outside_0_to_1_is_refused_before_any_work(tmp_path, pad):
    (tmp_path / "src" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="pad is a share of the image from 0 to 1"):
        prepare(tmp_path / "src", tmp_path / "dst", workers=1, pad=pad, progress=False)
    assert not (tmp_path / "dst").exists()


def test_a_file_as_destination_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").write_text("not a folder")
    with pytest.raises(FileExistsError, match="must be a folder"):
        prepare(tmp_path / "src", tmp_path / "dst", workers=1, progress=False)


def test_ctrl_c_stops_cleanly_and_keeps_the_finished_chunks(tmp_path):
    """Ctrl-C while the workers start: one "interrupted" line and exit 130, no traceback from each worker process,
    and the manifest holds whole rows that a re-run resumes from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    for person in sorted(p for p in LFW.iterdir() if p.is_dir())[:150]:
        shutil.copytree(person, src / person.name)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-m", "model.console", "prepare", str(src), str(dst), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (dst / MANIFEST).exists():
        time.sleep(0.1)
    time.sleep(1.0)  # the workers are starting (importing torch, loading MTCNN): where a stray traceback came from
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: to the whole process group, workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted")
    kept = read_manifest(dst)  # whole rows only, however few
    assert len(kept) < len(list_images(src))
    assert prepare(src, dst, workers=1, progress=False, only=set()).done_before == len(kept)  # resumes there


def test_a_re_run_reports_no_new_failures_and_runs_off_the_main_thread(prepared):
    """The corrupt file stays failed (not retried), so a re-run has nothing new to report: exit status 0. And a
    caller's worker thread may run prepare (signal handlers can only be changed in the main thread)."""
    import threading

    src, dst, _ = prepared
    result = {}
    worker = threading.Thread(target=lambda: result.update(s=prepare(src, dst, workers=1, progress=False)))
    worker.start()
    worker.join()
    assert (result["s"].done_before, result["s"].failed, result["s"].failed_now) == (8, 1, 0)


def test_a_ctrl_c_while_the_workers_start_is_raised_once_they_have_started():
    """Ignoring SIGINT while the pool starts its workers lost a Ctrl-C that came then: the run went on to the end
    and exited 0 (seen under load, where starting the workers took over a second)."""
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised here: the workers are being started
        reached_the_end = True
    assert reached_the_end and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _some_lfw_images(dst: Path, n: int) -> Path:
    """The first ``n`` LFW images (by person, then file) copied into ``dst/<person>/``."""
    files = (f for person in sorted(LFW.iterdir()) for f in sorted(person.glob("*.jpg")))
    for _, f in zip(range(n), files, strict=False):
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.parent.name / f.name)
    return dst


def _crops_without_rows(dst: Path) -> tuple[set[str], list]:
    rows = read_manifest(dst)
    crops = {str(p.relative_to(dst)) for p in (dst / "crops").rglob("*.png")}
    return crops - {r.crop for r in rows}, rows


def test_sigterm_stops_as_ctrl_c_does_and_leaves_no_worker_behind(tmp_path):
    """`kill PID` (Popen.terminate, docker stop) killed the parent with 143 and left its workers running for good,
    ~850 MB each, holding its stdout: a caller reading the output (`$(visage prepare ... --json)`) waited for
    ever. Now: exit 130 and the JSON object, as Ctrl-C, the finished chunks in the manifest, no process left."""
    import json
    import subprocess
    import sys
    import time

    src, dst = _some_lfw_images(tmp_path / "src", 40), tmp_path / "dst"  # two chunks
    proc = subprocess.Popen([sys.executable, "-m", "model.console", "prepare", str(src), str(dst), "--workers", "1",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any((dst / "crops").rglob("*.png")):
            time.sleep(0.05)
        proc.terminate()  # the parent only, as kill PID does
        out, err = proc.communicate(timeout=90)  # (waited for ever: the workers kept the pipe open)
        assert proc.returncode == 130 and json.loads(out)["error"] == "interrupted", err
        assert "Traceback" not in err
        assert _session_processes(proc.pid) == []
        lost, rows = _crops_without_rows(dst)
        assert rows and not lost
    finally:
        if _session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):
            continue
        if int(sid) == session and state != "Z":
            found.append(int(stat.parent.name))
    return found


def test_an_interrupt_keeps_the_rows_of_the_chunks_that_finish_meanwhile(tmp_path, monkeypatch):
    """The chunks in flight finished during the shutdown, their crops on disk, but their rows were thrown away:
    a re-run redid them (up to three chunks of 32 images)."""
    import threading
    import time

    import training.prepare

    monkeypatch.setattr(training.prepare, "CHUNK", 4)
    src, dst = _some_lfw_images(tmp_path / "src", 24), tmp_path / "dst"  # six chunks
    finished = threading.Event()

    def ctrl_c_at_the_first_crop() -> None:
        while not finished.is_set() and not any((dst / "crops").rglob("*.png")):
            time.sleep(0.01)
        if not finished.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    watcher = threading.Thread(target=ctrl_c_at_the_first_crop)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(src, dst, workers=1, progress=False)
    finally:
        finished.set()
        watcher.join()
    lost, rows = _crops_without_rows(dst)
    assert not lost and 0 < len(rows) < 24
    assert prepare(src, dst, workers=1, progress=False, only=set()).done_before == len(rows)


def test_photos_directly_in_src_are_named_as_not_read(tmp_path, capsys):
    """A photo beside the identity folders has no identity: it was passed over without a word."""
    import json

    from model.console import main

    src = tmp_path / "src"
    (src / "Colin_Powell").mkdir(parents=True)
    shutil.copy(LFW / "Colin_Powell" / "Colin_Powell_0001.jpg", src / "Colin_Powell")
    shutil.copy(LFW / "Colin_Powell" / "Colin_Powell_0002.jpg", src / "loose.jpg")
    assert main(["prepare", str(src), str(tmp_path / "dst"), "--workers", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["not_in_identity_folders"] == ["loose.jpg"] and json.loads(out)["total"] == 1
    assert "not read: 1 photos directly in" in err and "loose.jpg" in err
