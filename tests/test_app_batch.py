"""Batch enrollment and reindexing with the fake model: the same code paths as ``visage enroll`` / ``reindex``
(the real model runs them in test_app_e2e)."""

from __future__ import annotations

import csv
import json
import os
import resource
import sqlite3
import warnings
from dataclasses import replace

import httpx
import pytest
from app_helpers import BLUE, GREEN, RED, fake_pipeline, png, write_locked

from app.enroll import Abort, local_enroller, remote_enroller, run_batch, scan, write_failures
from app.errors import NoCurrentFaces
from app.main import create_app
from app.runtime import open_service
from app.service import FaceSelector
from app.settings import Settings
from app.store import SubjectRef, sha256

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    files = {"alice/a.png": png(RED), "alice/b.png": png(RED, width=300), "bob/c.jpg": png(BLUE, fmt="JPEG"),
             "pair/two.png": png(RED, GREEN), "junk/bad.jpg": b"not an image", "junk/notes.txt": b"ignored",
             "stray.png": png(GREEN)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_scan_takes_subject_folders_only_and_lists_what_it_does_not_read(folder):
    """A HEIC photo, a year's subfolder or an empty subject folder were passed over in silence (exit 0); a broken
    link to a photo was "not a photo format this reads (.jpg)", and the run still ended "every file enrolled"."""
    (folder / "bob" / "2019").mkdir()
    (folder / "bob" / "2019" / "x.jpg").write_bytes(png(BLUE, fmt="JPEG"))
    (folder / "bob" / "d.heic").write_bytes(b"heic")
    (folder / "bob" / "e.JFIF").write_bytes(png(BLUE, width=200, fmt="JPEG"))
    (folder / "carol").mkdir()
    (folder / "bob" / ".DS_Store").write_bytes(b"hidden: counted, not read")
    (folder / ".trash").mkdir()
    (folder / "bob" / "f.jpg").symlink_to(folder / "unmounted" / "f.jpg")  # a photo on a disk not mounted
    (folder / "dave").symlink_to(folder / "gone")
    os.mkfifo(folder / "bob" / "pipe.jpg")  # (opening it would wait for a writer for ever)
    found = scan(folder)
    assert [(i.subject, i.path.name) for i in found.items] == [
        ("alice", "a.png"), ("alice", "b.png"), ("bob", "c.jpg"), ("bob", "e.JFIF"), ("bob", "f.jpg"),
        ("junk", "bad.jpg"), ("pair", "two.png")]
    assert [s.removeprefix(f"{folder}/") for s in found.skipped] == [
        "bob/2019/: a folder inside a subject folder (not read)", "bob/d.heic: not a photo format this reads (.heic)",
        "bob/pipe.jpg: not a regular file (a pipe, socket or device): not read", "carol/: no photos",
        "dave: a broken link (its target is missing): not read",
        "junk/notes.txt: not a photo format this reads (.txt)", "stray.png: not in a subject folder",
        "2 hidden files or folders (names starting with '.'): not read"]
    report = run_batch([i for i in found.items if i.path.name == "f.jpg"], lambda *_: True)
    assert report.failed == 1 and report.failures[0]["error"] == "unreadable_file"  # a failure: exit status 1
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        scan(folder / "stray.png")
    with pytest.raises(FileNotFoundError):
        scan(folder / "missing")
    (folder / "empty" / "nested" / "deeper").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images in .*DIR/<subject>/<photo>"):
        scan(folder / "empty")  # a wrong path or layout is an error, not "0 images, success"


def test_names_that_are_not_utf8_are_reported_not_fatal(tmp_path, folder):
    """Folder and file names are bytes on Linux: a subject name that is not text is a failure row, a file name that
    is not UTF-8 still enrolls, and the failures CSV and the summary can be written (it was a crash)."""
    (folder / os.fsdecode(b"inv\xff")).mkdir()
    (folder / os.fsdecode(b"inv\xff") / "a.png").write_bytes(png(GREEN))
    (folder / "alice" / os.fsdecode(b"f\xfe.png")).write_bytes(png(RED, width=350))
    settings = Settings(data_dir=tmp_path / "data")
    service = open_service(settings, with_index=False, pipeline=fake_pipeline())
    local = run_batch(scan(folder).items, local_enroller(service, "single"))
    service.gallery.close()
    app = create_app(Settings(data_dir=tmp_path / "remote", api_keys="k"), pipeline=fake_pipeline())
    with TestClient(app, base_url="http://visage", headers={"X-API-Key": "k"}) as client:
        app.state.runtime.wait_ready(30)
        remote = run_batch(scan(folder).items, remote_enroller(client, "single"))
    for report in (local, remote):
        assert report.created == 4 and report.aborted is None  # alice's odd file name included
        odd = [f for f in report.failures if f["error"] == "bad_parameter"]
        assert [(f["subject"], os.path.basename(f["file"])) for f in odd] == [("inv\\xff", "a.png")]
        write_failures(tmp_path / "failures.csv", report.failures)
        assert len(list(csv.DictReader((tmp_path / "failures.csv").open()))) == 3
        json.dumps(report.to_dict(), ensure_ascii=False)


def test_remote_batch_waits_for_a_service_that_is_still_loading(monkeypatch):
    monkeypatch.setattr("app.enroll.time.sleep", lambda s: None)
    answers = iter([503, 503, 201])

    def service(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        body = {"created": True} if status == 201 else {"error": "not_ready", "detail": "loading"}
        return httpx.Response(status, json=body)

    with httpx.Client(base_url="http://visage", transport=httpx.MockTransport(service)) as client:
        assert remote_enroller(client, "single")(png(RED), "alice", "a.png") is True
    never_ready = httpx.MockTransport(lambda r: httpx.Response(503, json={"error": "not_ready", "detail": "x"}))
    client = httpx.Client(base_url="http://visage", transport=never_ready)
    with client, pytest.raises(Abort, match="not ready"):
        remote_enroller(client, "single")(png(RED), "alice", "a.png")


def test_remote_batch_waits_about_half_a_minute_for_a_service_that_is_restarting(monkeypatch):
    """Connection refused is a service being restarted as often as one that is gone: the batch gave up after 3 s
    (three tries), shorter than a supervisor's restart with the model loading."""
    slept: list[float] = []
    monkeypatch.setattr("app.enroll.time.sleep", slept.append)
    tries = iter([True] * 5 + [False])

    def service(request: httpx.Request) -> httpx.Response:
        if next(tries):
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(201, json={"created": True})

    with httpx.Client(base_url="http://visage", transport=httpx.MockTransport(service)) as client:
        assert remote_enroller(client, "single")(png(RED), "alice", "a.png") is True
    assert sum(slept) >= 30
    gone = httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)))
    with httpx.Client(base_url="http://visage", transport=gone) as client, pytest.raises(Abort, match="unreachable"):
        remote_enroller(client, "single")(png(RED), "alice", "a.png")


def test_remote_batch_waits_out_an_overloaded_service_as_it_says(monkeypatch):
    """503 overloaded (Retry-After: 1) is a busy service, not one still loading: it was retried 6 times with a
    growing back-off and the batch aborted with "not ready" after ~31 s."""
    slept: list[float] = []
    monkeypatch.setattr("app.enroll.time.sleep", slept.append)
    answers = iter([503] * 10 + [201])

    def service(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 201:
            return httpx.Response(201, json={"created": True})
        return httpx.Response(503, json={"error": "overloaded", "detail": "busy"}, headers={"Retry-After": "1"})

    with httpx.Client(base_url="http://visage", transport=httpx.MockTransport(service)) as client:
        assert remote_enroller(client, "single")(png(RED), "alice", "a.png") is True
    assert slept == [1.0] * 10
    busy = httpx.MockTransport(lambda r: httpx.Response(503, json={"error": "overloaded", "detail": "x"}))
    with httpx.Client(base_url="http://visage", transport=busy) as client, pytest.raises(Abort, match="overloaded"):
        remote_enroller(client, "single")(png(RED), "alice", "a.png")


def test_local_batch_is_idempotent_resumable_and_lists_failures(tmp_path, folder):
    settings = Settings(data_dir=tmp_path / "data")
    service = open_service(settings, with_index=False, pipeline=fake_pipeline())
    items = scan(folder).items
    report = run_batch(items, local_enroller(service, "single"))
    assert (report.created, report.existing, report.failed, len(report.subjects)) == (3, 0, 2, 2)
    assert {(f["subject"], f["error"]) for f in report.failures} == {
        ("pair", "multiple_faces"), ("junk", "unreadable_image")}
    write_failures(settings.failures_path, report.failures)
    rows = list(csv.DictReader(settings.failures_path.open()))
    assert list(rows[0]) == ["file", "subject", "error", "detail"] and len(rows) == 2
    calls = service.pipeline.embedder.calls
    again = run_batch(items, local_enroller(service, "largest"))
    assert (again.created, again.existing, again.failed) == (1, 3, 1)  # only the pair photo was new
    assert service.pipeline.embedder.calls == calls + 1  # already-enrolled images never reach the model
    write_failures(settings.failures_path, [])
    assert settings.failures_path.read_text().strip() == "file,subject,error,detail"
    service.gallery.close()


def test_a_file_over_the_size_limit_is_a_failure_read_no_further(tmp_path, folder):
    """A stray multi-gigabyte file in a subject folder was read whole into memory before being refused."""
    huge = folder / "alice" / "huge.jpg"
    with huge.open("wb") as fh:  # sparse: 4 GiB on paper, nothing on disk
        fh.truncate(4 * 1024**3)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    service = open_service(Settings(data_dir=tmp_path / "data"), with_index=False, pipeline=fake_pipeline())
    report = run_batch(scan(folder).items, local_enroller(service, "single"), max_bytes=1024 * 1024)
    service.gallery.close()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 100  # MiB, not 4 GiB
    (failure,) = [f for f in report.failures if f["file"].endswith("huge.jpg")]
    assert failure["error"] == "image_too_large" and "limit of 1048576 bytes" in failure["detail"]
    assert report.created == 3  # the rest of the batch went on


def test_local_batch_stops_at_a_gallery_that_cannot_be_written_and_resumes_later(tmp_path, folder, monkeypatch):
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 0.2)
    settings = Settings(data_dir=tmp_path / "data")
    service = open_service(settings, with_index=False, pipeline=fake_pipeline())
    items = scan(folder).items
    with write_locked(settings.data_dir / "visage.db"):
        report = run_batch(items, local_enroller(service, "single"))
    assert report.aborted and "database is locked" in report.aborted and report.to_dict()["not_attempted"] == 4
    assert (report.created, report.failed) == (0, 1)  # one attempt, not one failure per remaining image
    assert service.gallery.store.counts(service.model_version)["faces"] == 0
    again = run_batch(items, local_enroller(service, "single"))
    assert (again.created, again.failed, again.aborted) == (3, 2, None)
    service.gallery.close()


def test_remote_batch_goes_through_the_api(tmp_path, folder):
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys="k"), pipeline=fake_pipeline())
    with TestClient(app, base_url="http://visage", headers={"X-API-Key": "k"}) as client:
        app.state.runtime.wait_ready(30)
        report = run_batch(scan(folder).items, remote_enroller(client, "single"))
        assert (report.created, report.existing, report.failed) == (3, 0, 2)
        assert client.get("/subjects").json()["total"] == 2
        client.headers["X-API-Key"] = "wrong"
        refused = run_batch(scan(folder).items, remote_enroller(client, "single"))
        assert "refused the API key" in refused.aborted and refused.failed == 1
        assert refused.to_dict()["not_attempted"] == 4  # of 5: counted, not left out of every count


def test_a_remote_batch_to_a_url_that_is_not_a_visage_service_stops_at_the_first_file(tmp_path, folder):
    """A wrong path in --url, or another web server, failed every file one by one (404 no route, 501 pages)."""
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys="k"), pipeline=fake_pipeline())
    with TestClient(app, base_url="http://visage/v1", headers={"X-API-Key": "k"}) as client:
        app.state.runtime.wait_ready(30)
        report = run_batch(scan(folder).items, remote_enroller(client, "single"))
    assert "does not look like a Visage service" in report.aborted and "no route POST /v1/enroll" in report.aborted
    assert report.failed == 1 and report.to_dict()["not_attempted"] == 4

    def not_visage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(501, text="<html>Unsupported method ('POST')</html>")

    with httpx.Client(transport=httpx.MockTransport(not_visage), base_url="http://elsewhere") as client:
        report = run_batch(scan(folder).items, remote_enroller(client, "single"))
    assert "does not look like a Visage service (POST /enroll answered 501 http_501" in report.aborted

    answers = iter([httpx.Response(201, json={"created": True}),  # a Visage service, behind a proxy ...
                    httpx.Response(413, text="<html>413 Request Entity Too Large</html>"),  # ... that refuses one
                    *[httpx.Response(201, json={"created": True})] * 3])
    with httpx.Client(transport=httpx.MockTransport(lambda r: next(answers)), base_url="http://proxied") as client:
        report = run_batch(scan(folder).items, remote_enroller(client, "single"))
    assert (report.created, report.failed, report.aborted) == (4, 1, None)  # that file's failure, not the batch's
    assert report.failures[0]["error"] == "http_413"


def test_enrolling_again_after_new_weights_re_embeds_the_face_in_place(tmp_path):
    """A repeat enroll answered "already enrolled" with the old weights' face, which stays out of the index:
    /verify kept answering 409 and a batch enroll run again after an upgrade did nothing. Now the face is
    re-embedded in place (same id), also where its original was not stored and reindex cannot redo it."""
    settings = Settings(data_dir=tmp_path / "data")
    old = open_service(settings, pipeline=fake_pipeline("fake-v1"))
    old.store_images = False
    first = old.enroll(png(RED), SubjectRef(name="alice")).face
    old.gallery.close()
    new = open_service(settings, pipeline=fake_pipeline("fake-v2"))
    alice = SubjectRef(name="alice")
    with pytest.raises(NoCurrentFaces):
        new.verify(png(RED, width=200), alice, FaceSelector.parse("largest"), new.threshold())
    assert new.reindex().failed  # the original was not stored
    again = new.enroll(png(RED), alice)
    assert not again.created and again.face.id == first.id and again.face.model_version == "fake-v2"
    assert new.gallery.stats()["stale_faces"] == 0 and new.gallery.stats()["indexed_faces"] == 1
    assert new.verify(png(RED, width=200), alice, FaceSelector.parse("largest"), new.threshold()).match
    third = new.enroll(png(RED), alice)  # current now: nothing to redo
    assert not third.created and third.detected is None and third.face == again.face
    new.gallery.close()


def test_a_repeat_that_races_a_delete_or_another_repeat_answers_what_is_stored(tmp_path):
    """The model runs between reading the stored face and re-embedding it: a face deleted meanwhile was answered
    200 with its old id (acknowledging a face that is not there), and the slower of two repeats answered with
    the old weights' version though the stored face was already re-embedded."""
    settings = Settings(data_dir=tmp_path / "data")
    old = open_service(settings, pipeline=fake_pipeline("fake-v1"))
    first = old.enroll(png(RED), SubjectRef(name="alice")).face
    old.gallery.close()
    new = open_service(settings, pipeline=fake_pipeline("fake-v2"))
    alice, data = SubjectRef(name="alice"), png(RED)
    digest = sha256(data)
    found = new.find_enrolled(alice, digest)
    slow, fast = (new.repeat_face(found, data, FaceSelector()) for _ in range(2))
    assert new.repeated(alice, digest, data, found, fast).face.model_version == "fake-v2"
    late = new.repeated(alice, digest, data, found, slow)  # its reembed_face finds nothing stale: no update
    assert not late.created and late.face.id == first.id and late.face.model_version == "fake-v2"

    new.gallery.store.delete_face(first.id)  # deleted while a third repeat's model ran
    stale = (replace(found[0], model_version="fake-v1"), found[1])
    again = new.repeated(alice, digest, data, stale, new.repeat_face(stale, data, FaceSelector()))
    assert again.created and again.face.id != first.id
    assert [f.id for f in new.gallery.store.subject_faces(again.subject.id)] == [again.face.id]
    assert new.gallery.stats()["indexed_faces"] == 1
    new.gallery.close()


def move_out_of_sight(settings: Settings, face_id: int) -> None:
    """Move a stored face's box where the detector finds nothing, as if it no longer found the face."""
    conn = sqlite3.connect(settings.db_path)
    with conn:
        conn.execute("UPDATE faces SET box = '[0, 0, 10, 10]' WHERE id = ?", (face_id,))
    conn.close()


def test_a_repeat_whose_face_cannot_be_found_again_is_still_the_idempotent_200(tmp_path, caplog):
    """Re-embedding a face of other weights at its stored box can fail (the detector no longer finds it): the
    repeat answers as it always did, with the stored face, and says so in the log."""
    settings = Settings(data_dir=tmp_path / "data")
    old = open_service(settings, pipeline=fake_pipeline("fake-v1"))
    first = old.enroll(png(RED), SubjectRef(name="alice")).face
    old.gallery.close()
    move_out_of_sight(settings, first.id)
    new = open_service(settings, pipeline=fake_pipeline("fake-v2"))
    again = new.enroll(png(RED), SubjectRef(name="alice"))
    assert not again.created and again.face.id == first.id and again.face.model_version == "fake-v1"
    assert "could not be re-embedded" in caplog.text
    new.gallery.close()


def test_reindex_reembeds_old_versions_and_reports_what_it_cannot(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    old = open_service(settings, pipeline=fake_pipeline("fake-v1"))
    kept = old.enroll(png(RED), SubjectRef(name="alice")).face
    moved = old.enroll(png(GREEN), SubjectRef(name="alice")).face
    old.store_images = False
    lost = old.enroll(png(BLUE), SubjectRef(name="bob")).face
    old.gallery.close()
    move_out_of_sight(settings, moved.id)

    new = open_service(settings, pipeline=fake_pipeline("fake-v2"))
    assert new.gallery.stats()["stale_faces"] == 3 and new.gallery.stats()["indexed_faces"] == 0
    with pytest.raises(NoCurrentFaces):
        new.verify(png(RED), SubjectRef(name="bob"), FaceSelector.parse("largest"), new.threshold())
    report = new.reindex()
    assert report.redone == 1
    assert {(f["face_id"], f["error"]) for f in report.failed} == {
        (moved.id, "no_face_found"), (lost.id, "image_not_stored")}
    assert new.gallery.stats()["indexed_faces"] == 1
    result = new.verify(png(RED, width=200), SubjectRef(name="alice"), FaceSelector.parse("largest"), new.threshold())
    assert result.match and result.matched_face_id == kept.id
    assert new.reindex().redone == 0  # nothing left that can be redone
    new.gallery.close()


def test_an_interrupted_reindex_keeps_and_reports_what_it_redid(tmp_path):
    """Ctrl-C (or SIGTERM) said only "interrupted": the faces already re-embedded were kept but not reported."""
    settings = Settings(data_dir=tmp_path / "data")
    old = open_service(settings, pipeline=fake_pipeline("fake-v1"))
    for color in (RED, GREEN, BLUE):
        old.enroll(png(color), SubjectRef(name="alice"))
    old.gallery.close()
    new = open_service(settings, pipeline=fake_pipeline("fake-v2"))

    def ctrl_c_after_two(done: int, total: int) -> None:
        if done == 2:
            new.detect = lambda data: (_ for _ in ()).throw(KeyboardInterrupt)  # the next face's work is cut

    report = new.reindex(ctrl_c_after_two)
    assert (report.redone, report.interrupted, new.gallery.stats()["stale_faces"]) == (2, True, 1)
    del new.detect
    again = new.reindex()
    assert (again.redone, again.interrupted, new.gallery.stats()["stale_faces"]) == (1, False, 0)
    new.gallery.close()
