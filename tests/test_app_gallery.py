"""Store, index and gallery on a real SQLite file and real FAISS indexes in tmp_path, with hand-made vectors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from app_helpers import DIM, REPO, V1, V2, add, concurrently, near, open_gallery, unit, write_locked

from app.errors import FaceNotFound, NameTaken, NoCurrentFaces, StorageUnavailable, StoreUnreadable, SubjectNotFound
from app.gallery import Gallery
from app.index import FaceIndex, IndexConfig, IndexFileError, IndexFileMissing
from app.store import Store, SubjectRef
from model.score_norm import CohortNorm

KINDS = ["flat", "hnsw", "ivf"]


# -- store ---------------------------------------------------------------------------------------------------------


def test_store_add_is_idempotent_keeps_the_image_and_cleans_it_up(tmp_path):
    store = Store(tmp_path / "visage.db")
    vec = unit(1, 0)
    first = store.add_face(SubjectRef(name="alice"), "abc", b"jpeg-bytes", vec, V1, (1, 2, 3, 4), 0.8)
    again = store.add_face(SubjectRef(name="alice"), "abc", b"jpeg-bytes", unit(0, 1), V1, (1, 2, 3, 4), 0.8)
    assert first[2] is True and again[2] is False and again[0].id == first[0].id
    assert first[1].face_count == 1 and first[0].has_image and store.image("abc") == b"jpeg-bytes"
    # the same image for another subject is another face, sharing one stored blob
    other, _, created = store.add_face(SubjectRef(name="bob"), "abc", b"jpeg-bytes", vec, V1, (5, 6, 7, 8), 0.8)
    assert created and other.id != first[0].id
    store.delete_face(first[0].id)
    assert store.image("abc") == b"jpeg-bytes"  # bob still uses it
    store.delete_subject(other.subject_id)
    assert store.image("abc") is None  # no face uses it any more: the photo is gone too
    with pytest.raises(SubjectNotFound):
        store.add_face(SubjectRef(id=999), "x", None, vec, V1, (0, 0, 1, 1), 1.0)
    with pytest.raises(FaceNotFound):
        store.delete_face(first[0].id)


def test_store_connections_are_pooled_not_kept_per_thread(tmp_path):
    """A server's thread pool retires idle threads and starts new ones: the store must not keep one connection
    (two file handles) per thread it ever saw, only as many as ran transactions at once."""
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0))
    for _ in range(20):  # twenty short-lived threads, one after the other
        worker = threading.Thread(target=lambda: store.list_subjects(limit=10))
        worker.start()
        worker.join()
    assert store.open_connections == 1
    barrier = threading.Barrier(4)

    def together() -> None:
        with store.read() as conn:
            barrier.wait(timeout=10)  # four transactions open at the same time
            conn.execute("SELECT COUNT(*) FROM faces").fetchone()

    workers = [threading.Thread(target=together) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert store.open_connections == 4
    store.close()
    assert store.open_connections == 0
    assert store.subject(SubjectRef(name="alice")).face_count == 1  # usable again after close


def test_closing_the_store_waits_for_a_running_transaction(tmp_path):
    """Shutdown closed connections under running requests (a ProgrammingError, the write lost): close() now
    lets them finish first."""
    store = Store(tmp_path / "visage.db")
    inside, errors = threading.Event(), []

    def slow_write() -> None:
        try:
            with store.write() as conn:
                inside.set()
                time.sleep(0.5)  # close() is called meanwhile
                conn.execute("INSERT INTO subjects (name, metadata, created_at) VALUES ('late', '{}', 'now')")
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    worker = threading.Thread(target=slow_write)
    worker.start()
    assert inside.wait(10)
    store.close()
    worker.join()
    assert errors == [] and store.open_connections == 0
    assert store.subject(SubjectRef(name="late")).name == "late"


def test_a_failed_rollback_drops_the_connection_instead_of_pooling_it(tmp_path, monkeypatch):
    """A connection whose COMMIT and ROLLBACK both failed may still be inside its transaction (holding SQLite's
    write lock): pooled, it failed every later request. The caller gets the COMMIT's error."""
    failing: set[str] = set()

    class Flaky(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql in failing:
                error = sqlite3.OperationalError(f"disk I/O error on {sql} (simulated)")
                error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # what SQLite's own error carries
                raise error
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr("app.store.sqlite3.connect", lambda *a, **k: connect(*a, factory=Flaky, **k))
    store = Store(tmp_path / "visage.db")
    failing.update({"COMMIT", "ROLLBACK"})
    with pytest.raises(StorageUnavailable, match="on COMMIT"), store.write() as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    failing.clear()
    assert store.open_connections == 0
    assert store.counts(V1)["faces"] == 0  # a fresh connection, not one stuck in a transaction
    add(store, "alice", unit(1, 0))
    failing.add("BEGIN")  # an I/O error on a read is the disk's too: a 503, not a 500
    with pytest.raises(StorageUnavailable, match="visage.db could not be read .disk I/O error on BEGIN"):
        store.counts(V1)
    failing.clear()
    with pytest.raises(sqlite3.OperationalError, match="syntax error"), store.write() as conn:
        conn.execute("INSRT INTO meta VALUES ('k', 'v')")  # this code's own mistake: a bug (500), not a 503


def test_a_full_disk_is_storage_unavailable_and_stores_nothing_of_the_request(tmp_path, monkeypatch):
    """SQLite's own "database or disk is full" (a page cap stands in for the disk): a 503 the client may retry,
    the transaction rolled back, the store as it was, and writes work again once there is room."""
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0))
    with store.read() as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    connect = Store._connect

    def capped(self: Store) -> sqlite3.Connection:
        conn = connect(self)
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return conn

    monkeypatch.setattr(Store, "_connect", capped)
    store.close()  # the pooled connections were opened without the cap
    with pytest.raises(StorageUnavailable, match="visage.db could not be written .*full.*nothing was stored"):
        add(store, "bob", unit(0, 1), image=bytes(300_000))
    assert store.counts(V1)["faces"] == 1 and store.subject(SubjectRef(name="alice")).name == "alice"
    with pytest.raises(SubjectNotFound):
        store.subject(SubjectRef(name="bob"))
    monkeypatch.setattr(Store, "_connect", connect)
    store.close()
    add(store, "bob", unit(0, 1), image=bytes(300_000))
    assert store.counts(V1)["faces"] == 2


def test_close_from_inside_a_transaction_does_not_wait_for_itself(tmp_path):
    store = Store(tmp_path / "visage.db")
    started = time.monotonic()
    with pytest.raises(sqlite3.ProgrammingError), store.read():  # its own transaction cannot end: a caller's bug
        store.close(wait_s=5)
    assert time.monotonic() - started < 2 and store.open_connections == 0


def test_a_damaged_database_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "visage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnreadable, match="visage.db is not a usable SQLite database"):
        Store(path)
    good = tmp_path / "good.db"
    Store(good).close()
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 0.2)
    with write_locked(good), pytest.raises(StorageUnavailable, match="locked"):
        Store(good)  # another process writing: the healthy file is locked, not damaged


def test_damage_found_after_the_open_is_a_clear_error_naming_the_file(tmp_path):
    """Pages damaged past what the open reads (a restore that left the old visage.db-wal to be replayed onto the
    copy) raised a bare "database disk image is malformed" from the first query: /readyz said only that."""
    store = Store(tmp_path / "visage.db")
    for i in range(300):
        add(store, f"s{i}", unit(1, i % 8))
    store.close()
    data = bytearray((tmp_path / "visage.db").read_bytes())
    for page in range(5, len(data) // 4096, 3):
        data[page * 4096 + 100: page * 4096 + 400] = b"\xff" * 300
    (tmp_path / "visage.db").write_bytes(bytes(data))
    store = Store(tmp_path / "visage.db")  # the schema and meta pages are sound
    with pytest.raises(StoreUnreadable, match=r"visage.db is damaged \(database disk image is malformed\): stop the "
                                              r"service and restore a backup \(visage restore BACKUP"):
        store.list_subjects(limit=500)
    store.close()


def test_writes_queued_behind_another_process_lock_each_fail_after_one_busy_timeout(tmp_path, monkeypatch):
    """Behind another process's write lock, this process's writers queued on its own lock and each began SQLite's
    full busy wait only once it had that lock: the n-th failed after n timeouts (30 s, 60 s, ... 16 minutes for
    a 32-deep queue), holding its admission place all along. Now every write has one timeout from its call."""
    store = Store(tmp_path / "visage.db")
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 1.5)
    took: dict[int, float] = {}

    def enroll(i: int) -> None:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match="locked"):
            add(store, f"person_{i}", unit(1, i))
        took[i] = time.monotonic() - start

    with write_locked(tmp_path / "visage.db"):
        concurrently(enroll, 4, join_s=10)
    assert sorted(took) == [0, 1, 2, 3] and max(took.values()) < 3.0, took  # was 1.5, 3, 4.5, 6 s
    add(store, "later", unit(1, 9))  # the lock gone, writes work (and wait the full timeout again)
    assert store.generation() == 1
    store.close()


def test_store_subjects_page_rename_and_generation(tmp_path):
    store = Store(tmp_path / "visage.db")
    assert store.generation() == 0
    for i in range(5):
        add(store, f"person_{i}", unit(1, i))
    assert store.generation() == 5
    total, page = store.list_subjects(offset=1, limit=2)
    assert total == 5 and [s.name for s in page] == ["person_1", "person_2"]
    assert store.list_subjects(name="person_4")[0] == 1
    assert store.list_subjects(name="%")[0] == 0  # LIKE wildcards are escaped
    renamed = store.update_subject(page[0].id, name="renamed", metadata={"team": "x"})
    assert renamed.name == "renamed" and renamed.metadata == {"team": "x"}
    with pytest.raises(NameTaken):
        store.update_subject(page[0].id, name="person_2")
    assert store.delete_subject(page[0].id) == 1
    assert store.generation() == 6  # the cascade-deleted face was logged by the trigger
    with pytest.raises(SubjectNotFound):
        store.subject(page[0].id)


def test_metadata_stored_with_nan_by_older_versions_reads_as_null(tmp_path):
    store = Store(tmp_path / "visage.db")
    add(store, "old", unit(1, 0))
    subject = store.list_subjects(name="old")[1][0].id
    store.update_subject(subject, metadata={"n": float("nan"), "m": 1})  # json.dumps writes NaN, as before
    assert store.subject(subject).metadata == {"n": None, "m": 1}
    json.dumps(store.subject(subject).metadata, allow_nan=False)  # what the response encoder demands


def test_names_stored_as_typed_by_older_versions_are_brought_to_nfc_once(tmp_path, caplog):
    """Before app.names, names were stored as typed: an NFD "José" stays findable by name after the upgrade,
    and one that would collide with an existing NFC twin keeps its name (reachable by id) and is logged."""
    path = tmp_path / "visage.db"
    store = Store(path)
    for i, name in enumerate(["a", "b", "Zo\u00eb"]):
        add(store, name, unit(1, i))
    nfd, twin, plain = (s.id for s in store.list_subjects()[1])
    store.close()
    conn = sqlite3.connect(path)
    with conn:  # what an older version left: names as typed, no marker
        conn.execute("DELETE FROM meta WHERE key = 'names'")
        conn.execute("UPDATE subjects SET name = ? WHERE id = ?", ("Jose\u0301", nfd))
        conn.execute("UPDATE subjects SET name = ? WHERE id = ?", ("Zoe\u0308\u200b", twin))
    conn.close()
    with caplog.at_level("WARNING", logger="visage.store"):
        store = Store(path)
    assert store.subject(nfd).name == "Jos\u00e9"
    assert store.subject(twin).name == "Zoe\u0308\u200b"  # "Zo\u00eb" was taken
    assert store.subject(plain).name == "Zo\u00eb"
    assert f"subject {twin} is named" in caplog.text
    store.update_subject(nfd, name="Jose\u0301")  # below the API, the store writes what it is given
    store.close()
    assert Store(path).subject(nfd).name == "Jose\u0301"  # the migration ran once, not at every open


def test_names_are_brought_to_a_new_naming_rule_once(tmp_path):
    """A database whose names were canonical under the earlier rule (zero-width characters only) holds a
    "y" + right-to-left mark apart from "y"; under the rule that trims every invisible character it would be
    unreachable by name, so opening it renames it once (and a collision keeps its name, as above)."""
    path = tmp_path / "visage.db"
    store = Store(path)
    add(store, "x", unit(1, 0))
    add(store, "y", unit(1, 1))
    marked, twin = (s.id for s in store.list_subjects()[1])
    store.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = 'nfc-trimmed' WHERE key = 'names'")  # the earlier rule's marker
        conn.execute("UPDATE subjects SET name = ? WHERE id = ?", ("x\u200f", marked))
        conn.execute("UPDATE subjects SET name = ? WHERE id = ?", ("y\u00ad", twin))
    conn.close()
    store = Store(path)
    assert store.subject(marked).name == "x" and store.subject(twin).name == "y"
    assert store.list_subjects(name="x")[1][0].id == marked


# -- index ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("faces", [0, 10])
def test_a_small_ivf_index_searches_exactly_without_faiss_warnings(capfd, faces):
    """Under 2 x 39 faces an IVF index has one list: FAISS's k-means printed "WARNING clustering 1 points to 1
    centroids: please provide at least 39 training points" to the service's stderr at every start (the empty
    index made first) and every rebuild of a small gallery, a warning about nothing the operator can change."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(faces, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = FaceIndex.build(DIM, IndexConfig(kind="ivf"), V1, np.arange(1, faces + 1), vectors, generation=0)
    assert "WARNING" not in capfd.readouterr().err
    if faces:
        assert list(index.search(vectors[:3], 1)[1][:, 0]) == [1, 2, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_index_add_remove_search_save_load(tmp_path, kind):
    cfg = IndexConfig(kind=kind, ivf_nlist=4)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 310, dtype=np.int64)
    index = FaceIndex.build(DIM, cfg, V1, ids, vectors, generation=7)
    sims, found = index.search(vectors[:3], 1)
    assert list(found[:, 0]) == [10, 11, 12] and np.allclose(sims[:, 0], 1.0, atol=1e-5)
    index.remove(np.array([10, 11]))
    assert len(index) == 298 and 10 not in index.ids()
    _, found = index.search(vectors[:1], 5)
    assert 10 not in found[0] and 11 not in found[0]
    assert index.upsert(np.array([500]), vectors[:1]) is True
    assert index.search(vectors[:1], 1)[1][0, 0] == 500
    # replacing a vector in place: flat and IVF can, HNSW asks for a rebuild
    assert index.upsert(np.array([12]), vectors[5:6]) is (kind != "hnsw")
    index.save(tmp_path / "ix")
    loaded = FaceIndex.load(tmp_path / "ix", cfg)
    assert loaded.generation == 7 and np.array_equal(loaded.ids(), index.ids())
    assert np.array_equal(loaded.search(vectors[:4], 3)[1], index.search(vectors[:4], 3)[1])


def test_index_search_pads_when_there_are_fewer_faces_than_k():
    index = FaceIndex.build(DIM, IndexConfig(), V1, np.array([1, 2]), np.stack([unit(1), unit(0, 1)]), 0)
    sims, ids = index.search(unit(1), 5)
    assert list(ids[0]) == [1, 2, -1, -1, -1] and sims[0, 0] == pytest.approx(1.0)


# -- gallery -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gallery_identify_ranks_subjects_by_their_best_face(tmp_path, kind):
    gallery = open_gallery(tmp_path, kind)
    probe = unit(1, 0, 0)
    # alice has 40 faces all closer to the probe than bob's single face: they must not crowd bob out of a top-2
    for i in range(40):
        add(gallery.store, "alice", near(probe, 0.1 + 0.001 * i, axis=1 + i % 6))
    bob = add(gallery.store, "bob", near(probe, 0.5))
    add(gallery.store, "carol", unit(0, 0, 0, 1))
    hits = gallery.identify(probe, k=2)[0]
    assert [h.name for h in hits] == ["alice", "bob"]
    assert hits[0].similarity == pytest.approx(np.cos(0.1), abs=1e-4)
    assert hits[1].similarity == pytest.approx(np.cos(0.5), abs=1e-4) and hits[1].face_id == bob
    assert [h.name for h in gallery.identify(probe, k=10)[0]] == ["alice", "bob", "carol"]
    gallery.store.delete_subject(gallery.store.subject(SubjectRef(name="alice")).id)
    assert [h.name for h in gallery.identify(probe, k=2)[0]] == ["bob", "carol"]
    gallery.store.delete_face(bob)
    assert [h.name for h in gallery.identify(probe, k=2)[0]] == ["carol"]
    assert gallery.agreement()["agree"]


def test_gallery_verify_uses_the_subjects_most_similar_face(tmp_path):
    gallery = open_gallery(tmp_path)
    far_face = add(gallery.store, "alice", unit(0, 1))
    close_face = add(gallery.store, "alice", near(unit(1), 0.2))
    subject = gallery.store.subject(SubjectRef(name="alice"))
    similarity, face_id = gallery.best_match(subject.id, unit(1))
    assert face_id == close_face and similarity == pytest.approx(np.cos(0.2), abs=1e-5)
    gallery.store.delete_face(close_face)
    assert gallery.best_match(subject.id, unit(1))[1] == far_face


@pytest.mark.parametrize("kind", KINDS)
def test_identify_and_verify_rank_by_the_weights_normalised_score(tmp_path, kind):
    """A cohort crowded along axis 0: bob's face sits in the crowd (a hub), alice's away from it. The plain cosine
    puts bob first for this probe; the normalised score puts alice first, in the index's search and in the exact
    per-subject check alike, with the same numbers as the scorer itself."""
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(100, DIM)).astype(np.float32) * 0.3
    cohort[:, 0] += 1.0
    scorer = CohortNorm(cohort / np.linalg.norm(cohort, axis=1, keepdims=True), k=8)
    probe = unit(0.6, 0.8)
    bob_face, alice_face = unit(0.95, 0.31), unit(0.1, 0.9, 0.42)
    assert probe @ bob_face > probe @ alice_face
    store = Store(tmp_path / "visage.db")
    add(store, "bob", bob_face)
    alice = add(store, "alice", alice_face)
    gallery = Gallery(store, tmp_path / "index.faiss", V1, DIM, IndexConfig(kind=kind), scorer)
    gallery.open()
    hits = gallery.identify(probe, k=2)[0]
    assert [h.name for h in hits] == ["alice", "bob"] and hits[0].face_id == alice
    assert hits[0].similarity == pytest.approx(scorer.score(probe, alice_face), abs=1e-5)
    assert hits[1].similarity == pytest.approx(scorer.score(probe, bob_face), abs=1e-5)
    score, face = gallery.best_match(store.subject(SubjectRef(name="alice")).id, probe)
    assert face == alice and score == pytest.approx(hits[0].similarity, abs=1e-5)
    # a face enrolled after opening reaches the index through the change log, with its offset column
    carol_face = unit(0.2, 0.95, 0.0, 0.25)
    carol = add(store, "carol", carol_face)
    hits = {h.name: h for h in gallery.identify(probe, k=3)[0]}
    assert hits["carol"].face_id == carol
    assert hits["carol"].similarity == pytest.approx(scorer.score(probe, carol_face), abs=1e-5)
    gallery.close()
    again = Gallery(Store(tmp_path / "visage.db"), tmp_path / "index.faiss", V1, DIM, IndexConfig(kind=kind), scorer)
    assert again.open() == "loaded"  # same weights, same cohort: the saved index is reused
    again.close()
    # the saved index holds this cohort's offsets: opened with plain cosine scoring it is rebuilt, not reused
    plain = Gallery(Store(tmp_path / "visage.db"), tmp_path / "index.faiss", V1, DIM, IndexConfig(kind=kind))
    assert plain.open().startswith("rebuilt") and "|cosine" in plain.opened_by
    names = [h.name for h in plain.identify(probe, k=3)[0]]
    assert names.index("bob") < names.index("alice")  # by plain cosine the hub wins again
    plain.close()


def test_model_versions_are_never_compared(tmp_path):
    store = Store(tmp_path / "visage.db")
    add(store, "old_only", unit(1), version=V1)
    add(store, "both", unit(1, 0.1), version=V1)
    current = add(store, "both", unit(0, 1), version=V2)
    gallery = Gallery(store, tmp_path / "index.faiss", V2, DIM)
    gallery.open()
    assert list(gallery.index.ids()) == [current]
    assert gallery.stats()["stale_faces"] == 2 and gallery.stats()["indexed_faces"] == 1
    hits = gallery.identify(unit(1), k=5)[0]
    assert [h.name for h in hits] == ["both"] and hits[0].face_id == current  # the V1 face is invisible
    with pytest.raises(NoCurrentFaces, match="reindex"):
        gallery.best_match(store.subject(SubjectRef(name="old_only")).id, unit(1))
    # re-embedding a stale face (what `visage reindex` does) makes it searchable at once
    old = store.stale_faces(V2)[0]
    assert store.reembed_face(old.id, V1, unit(1), V2, old.box, 0.9)
    assert not store.reembed_face(old.id, V1, unit(1), V2, old.box, 0.9)  # already done: no double update
    assert gallery.identify(unit(1), k=1)[0][0].name == "old_only"


# -- the index is a cache of the store ------------------------------------------------------------------------------


def test_index_is_loaded_when_it_agrees_and_replays_later_changes(tmp_path):
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    gallery.close()
    later = Store(tmp_path / "visage.db")  # another process, while the service is down
    add(later, "bob", unit(0, 1))
    later.close()
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("loaded, replayed")
    assert gallery.identify(unit(0, 1), 1)[0][0].name == "bob"
    gallery.close()
    assert open_gallery(tmp_path).opened_by == "loaded"


def test_temp_files_of_index_saves_a_kill_interrupted_are_removed_at_the_next_open(tmp_path):
    """A kill -9 during a save (docker stop's SIGKILL on a long one) left .index.faiss.*.tmp, as large as the index,
    and nothing removed it: they piled up at each such restart until the disk was full."""
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    gallery.close()
    index_file = gallery.index_path
    abandoned, writing = (index_file.parent / f".{index_file.name}.{tag}.tmp" for tag in ("abc123", "def456"))
    for path in (abandoned, writing):
        path.write_bytes(b"\0" * 1000)
    old = time.time() - 3600
    os.utime(abandoned, (old, old))
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by == "loaded"
    assert not abandoned.exists() and writing.exists()  # one still being written (another worker's) is left
    assert gallery.identify(unit(1), 1)[0][0].name == "alice"
    gallery.close()


def test_a_new_gallery_says_its_index_was_built_not_rebuilt_after_an_error(tmp_path, caplog):
    """The first start logged "rebuilt (no index file (No such file or directory))", which read like a fault."""
    with caplog.at_level("INFO", logger="visage.gallery"):
        gallery = open_gallery(tmp_path)
    assert gallery.opened_by == "built (new gallery)"
    assert "index flat: built (new gallery) (0 faces" in caplog.text and "No such file" not in caplog.text
    gallery.close()
    assert open_gallery(tmp_path).opened_by == "loaded"


def test_index_is_rebuilt_when_its_file_is_missing_or_damaged(tmp_path):
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    gallery.close()
    (tmp_path / "index.faiss").unlink()
    gallery = open_gallery(tmp_path)  # faces but no index file (e.g. enrolled by `visage enroll` before any start)
    assert gallery.opened_by == "built (no saved index file)"
    assert gallery.identify(unit(1), 1)[0][0].name == "alice"
    gallery.close()
    raw = (tmp_path / "index.faiss").read_bytes()
    (tmp_path / "index.faiss").write_bytes(raw[: len(raw) // 2])
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt (index file is damaged")
    assert gallery.agreement()["agree"]
    with pytest.raises(IndexFileError, match=r"index file cannot be read \(Is a directory\)") as caught:
        FaceIndex.load(tmp_path, IndexConfig())  # a file that is there but unreadable is still a problem
    assert not isinstance(caught.value, IndexFileMissing)


def test_an_index_file_whose_vectors_were_damaged_is_rebuilt(tmp_path):
    """Only the ids were checked on load: a damaged vector (bit rot, a bad copy) was served as it was, and /identify
    named alice for bob's face with a score of 1e28."""
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    add(gallery.store, "bob", unit(0, 1))
    alice = gallery.scorer.gallery_vectors(unit(1)[None]).astype(np.float32).tobytes()
    gallery.close()
    raw = (tmp_path / "index.faiss").read_bytes()
    assert raw.count(alice) == 1
    at = raw.index(alice) + 4  # alice's second coordinate: 0 -> 1e30
    (tmp_path / "index.faiss").write_bytes(raw[:at] + np.float32(1e30).tobytes() + raw[at + 4 :])
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by == "rebuilt (index file is damaged (its vectors do not match their checksum))"
    hit = gallery.identify(unit(0, 1), 1)[0][0]
    assert hit.name == "bob" and hit.similarity == pytest.approx(1.0)
    gallery.close()


def test_an_index_saved_from_another_history_of_the_database_is_rebuilt(tmp_path):
    """A plain copy of the database put back (a volume snapshot, not `visage backup`) keeps its store id; one write
    then brought it to the saved index's generation with the same face ids but other people: the index loaded,
    and carol's face was answered as dave's."""
    db = tmp_path / "visage.db"
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    add(gallery.store, "bob", unit(0, 1))
    gallery.close()
    shutil.copy(db, tmp_path / "copy.db")  # (closed: everything is in the main file)
    gallery = open_gallery(tmp_path)
    carol = add(gallery.store, "carol", unit(0, 0, 1))
    gallery.close()  # the index is saved at generation 3, with carol
    shutil.copy(tmp_path / "copy.db", db)  # the copy put back ...
    store = Store(db)
    assert add(store, "dave", unit(0, 0, 0, 1)) == carol and store.generation() == 3  # ... and written to
    store.close()
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt (index file was saved from another history of this database")
    assert gallery.identify(unit(0, 0, 0, 1), 1)[0][0].name == "dave"
    assert gallery.identify(unit(0, 0, 1), 1)[0][0].similarity == pytest.approx(0.0, abs=1e-6)  # carol is gone
    gallery.close()
    assert open_gallery(tmp_path).opened_by == "loaded"


def test_a_database_made_before_change_tokens_gets_them_and_its_index_is_rebuilt_once(tmp_path):
    db = tmp_path / "visage.db"
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    gallery.close()
    conn = sqlite3.connect(db)
    with conn:  # as an older Visage left it: no token column, triggers without it
        for name in ("faces_added", "faces_changed", "faces_removed"):
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("ALTER TABLE changes DROP COLUMN token")
        conn.execute("CREATE TRIGGER faces_added AFTER INSERT ON faces BEGIN INSERT INTO changes (face_id) "
                     "VALUES (NEW.id); END")
    conn.close()
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt")
    assert gallery.store.change_token(1) is None  # older changes keep none
    add(gallery.store, "bob", unit(0, 1))
    assert len(gallery.store.change_token(2)) == 16
    assert gallery.identify(unit(0, 1), 1)[0][0].name == "bob"
    gallery.close()
    assert open_gallery(tmp_path).opened_by == "loaded"


def test_index_is_rebuilt_when_a_row_was_added_behind_its_back(tmp_path):
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    gallery.close()
    conn = sqlite3.connect(tmp_path / "visage.db")
    with conn:  # a face written without the change log knowing (e.g. a restored backup, a manual fix)
        conn.execute("INSERT INTO faces (subject_id, embedding, model_version, image_sha256, box, quality, "
                     "created_at) VALUES (1, ?, ?, 'manual', '[0,0,1,1]', 1.0, 'now')", (unit(0, 1).tobytes(), V1))
        conn.execute("DELETE FROM changes WHERE seq > 1")
    conn.close()
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt (index disagrees with the store")
    assert len(gallery.index) == 2 and gallery.identify(unit(0, 1), 1)[0][0].similarity == pytest.approx(1.0)


def test_index_of_another_model_version_or_kind_is_rebuilt(tmp_path):
    gallery = open_gallery(tmp_path, version=V1)
    add(gallery.store, "alice", unit(1), version=V1)
    add(gallery.store, "alice", unit(0, 1), version=V2)
    gallery.close()
    gallery = open_gallery(tmp_path, version=V2)
    assert "holds model-v1" in gallery.opened_by and len(gallery.index) == 1
    gallery.close()
    gallery = open_gallery(tmp_path, kind="hnsw", version=V2)
    assert "settings ask for hnsw" in gallery.opened_by and len(gallery.index) == 1


def test_hnsw_filters_removed_faces_and_rebuilds_for_a_replaced_vector(tmp_path):
    gallery = open_gallery(tmp_path, kind="hnsw")
    ids = [add(gallery.store, f"p{i}", near(unit(1), 0.05 * i)) for i in range(5)]
    gallery.sync()
    gallery.store.delete_face(ids[0])
    assert [h.face_id for h in gallery.identify(unit(1), 2)[0]] == ids[1:3]
    assert gallery.index.tombstones == {ids[0]}
    gallery.close()
    gallery = open_gallery(tmp_path, kind="hnsw")  # tombstones survive a save and load
    assert gallery.opened_by == "loaded" and gallery.index.tombstones == {ids[0]}
    row = gallery.store.subject_faces(gallery.store.subject(SubjectRef(name="p1")).id)[0]
    gallery.store.reembed_face(row.id, V1, unit(0, 1), "model-v0", row.box, 1.0)  # vector replaced
    gallery.store.reembed_face(row.id, "model-v0", unit(0, 1), V1, row.box, 1.0)
    gallery.sync()
    assert gallery.opened_by.startswith("rebuilt") and not gallery.index.tombstones
    assert gallery.identify(unit(0, 1), 1)[0][0].name == "p1"


# -- other processes and threads ----------------------------------------------------------------------------------


def test_an_index_that_cannot_be_saved_at_start_up_is_logged_and_served_from_memory(tmp_path, caplog):
    """A rebuild whose save failed (disk full, a read-only folder) raised out of open(): the worker's /readyz said
    "failed to load" for good although the store was fine and the index was right in memory."""
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0))
    folder = tmp_path / "cache"
    folder.write_text("a file where the index folder was")  # the index can be neither read nor written
    gallery = Gallery(store, folder / "index.faiss", V1, DIM, IndexConfig())
    with caplog.at_level("WARNING", logger="visage.gallery"):
        assert gallery.open().startswith("rebuilt")
    assert any("index not saved" in r.getMessage() for r in caplog.records)
    assert gallery.identify(unit(1, 0)[None], k=1)[0][0].name == "alice"
    add(store, "bob", unit(1, 1))  # and it keeps up with the store
    assert gallery.identify(unit(1, 1)[None], k=1)[0][0].name == "bob"
    gallery.close()


def test_an_index_that_cannot_be_saved_at_close_is_logged_and_rebuilt_at_the_next_start(tmp_path, caplog):
    folder = tmp_path / "cache"
    gallery = Gallery(Store(tmp_path / "visage.db"), folder / "index.faiss", V1, DIM, IndexConfig())
    gallery.open()
    add(gallery.store, "alice", unit(1, 0))
    shutil.rmtree(folder)  # (open saved the index it built)
    folder.write_text("a file where the index folder was")  # the save's folder cannot be made
    with caplog.at_level("WARNING", logger="visage.gallery"):
        gallery.close()  # no exception: the store is closed and nothing was lost
    assert any("index not saved" in r.getMessage() for r in caplog.records)
    folder.unlink()
    reopened = Gallery(Store(tmp_path / "visage.db"), folder / "index.faiss", V1, DIM, IndexConfig())
    reopened.open()
    assert reopened.store.counts(V1)["faces"] == 1 and reopened.opened_by == "built (no saved index file)"
    assert reopened.identify(unit(1, 0)[None], k=1)[0][0].name == "alice"
    reopened.close()


def test_writes_from_another_process_are_seen_without_a_restart(tmp_path):
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1))
    script = (
        "import sys, numpy as np\n"
        "from app.store import Store, SubjectRef\n"
        "s = Store(sys.argv[1])\n"
        "v = np.zeros(8, np.float32); v[1] = 1\n"
        "s.add_face(SubjectRef(name='bob'), 'b', b'img', v, 'model-v1', (0, 0, 1, 1), 1.0)\n"
        "s.delete_subject(s.subject(SubjectRef(name='alice')).id)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "visage.db")], cwd=REPO, check=True, timeout=60)
    hits = gallery.identify(unit(1, 1), 5)[0]
    assert [h.name for h in hits] == ["bob"]
    assert gallery.agreement() | {"generation": 0, "index_generation": 0} == {
        "agree": True, "store_faces": 1, "indexed_faces": 1, "generation": 0, "index_generation": 0}


def test_kill_9_during_writes_loses_no_acknowledged_face(tmp_path):
    """A writer prints each face id after its commit returns; kill -9 it mid-stream; every printed id is there."""
    script = (
        "import sys, numpy as np\n"
        "from app.store import Store, SubjectRef\n"
        "s = Store(sys.argv[1])\n"
        "for i in range(100000):\n"
        "    v = np.random.default_rng(i).normal(size=8).astype(np.float32); v /= np.linalg.norm(v)\n"
        "    f, _, _ = s.add_face(SubjectRef(name=f's{i % 50}'), f'sha{i}', b'x' * 5000, v, 'model-v1',"
        " (0, 0, 1, 1), 1.0)\n"
        "    print(f.id, flush=True)\n"
    )
    gallery = open_gallery(tmp_path)
    gallery.close()
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "visage.db")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    acknowledged = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 60:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    gallery = open_gallery(tmp_path)
    _, stored = gallery.store.current_ids(V1, DIM)
    assert set(acknowledged) <= set(stored.tolist())
    assert gallery.agreement()["agree"] and gallery.opened_by.startswith("loaded, replayed")
    assert json.loads(json.dumps(gallery.stats()))["faces"] == len(stored)


def test_concurrent_enroll_delete_and_search_keep_store_and_index_in_agreement(tmp_path):
    gallery = open_gallery(tmp_path)
    errors: list[BaseException] = []
    done = {"enrolled": 0, "deleted": 0, "searched": 0}
    stop = time.monotonic() + 2.0

    def enroller(worker: int) -> None:
        i = 0
        while time.monotonic() < stop:
            try:
                add(gallery.store, f"s{i % 5}", near(unit(1), 0.01 * (i % 50)), sha=f"w{worker}-{i}")
                gallery.sync()
                done["enrolled"] += 1
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
                errors.append(exc)
            i += 1

    def deleter() -> None:
        while time.monotonic() < stop:
            try:
                total, subjects = gallery.store.list_subjects(limit=5)
                if subjects:
                    gallery.store.delete_subject(subjects[0].id)
                    gallery.sync()
                    done["deleted"] += 1
            except SubjectNotFound:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            time.sleep(0.01)

    def searcher() -> None:
        while time.monotonic() < stop:
            try:
                for hit in gallery.identify(unit(1), 3)[0]:
                    assert hit.name.startswith("s")
                done["searched"] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=enroller, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=deleter), threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert min(done.values()) >= 3, done
    report = gallery.agreement()
    assert report["agree"] and report["generation"] == report["index_generation"]


def test_faiss_threads_come_from_the_settings(monkeypatch):
    import faiss

    from app.index import set_faiss_threads
    from app.settings import Settings

    before = faiss.omp_get_max_threads()
    try:
        monkeypatch.setenv("VISAGE_FAISS_THREADS", "2")
        set_faiss_threads(Settings().faiss_threads)
        assert faiss.omp_get_max_threads() == 2
        set_faiss_threads(0)  # 0 = leave FAISS's own choice alone
        assert faiss.omp_get_max_threads() == 2
        monkeypatch.delenv("VISAGE_FAISS_THREADS")
        assert Settings().faiss_threads == 1  # the default: one query at a time searches fastest on one thread
    finally:
        faiss.omp_set_num_threads(before)
