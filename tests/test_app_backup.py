"""``app.backup`` on real SQLite files: a consistent copy under concurrent writes, never overwriting, never
half-written, and an index that a restore never lets answer for another database. (The command line and a
backup from under a real uvicorn: test_app_commands.py, test_app_e2e.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import stat
import threading
import time

import pytest
from app_helpers import V1, add, open_gallery, unit

from app import backup as backup_module
from app.backup import backup_database, backup_into_folder
from app.store import Store, SubjectRef
from model.console import main


def restore(backup, folder) -> None:
    """docs/SERVICE.md, Operations, Restoring (with the service stopped)."""
    for sidecar in ("visage.db-wal", "visage.db-shm"):
        (folder / sidecar).unlink(missing_ok=True)
    (folder / "visage.db").write_bytes(backup.read_bytes())


def test_backup_is_a_consistent_private_copy_taken_while_another_thread_writes(tmp_path):
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0), image=b"original photo bytes")
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            add(store, f"writer-{i}", unit(0, 1))
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.05)
        report = backup_database(store.path, tmp_path / "copy.db")
    finally:
        stop.set()
        writer.join()
    assert report.path == tmp_path / "copy.db" and report.images == 1 and report.faces == report.subjects > 1
    assert stat.S_IMODE(os.stat(report.path).st_mode) == 0o600  # faces and photos: the owner's alone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]  # no -wal
    copy = Store(tmp_path / "copy.db")
    with copy.read() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.counts(V1)["faces"] == report.faces  # one snapshot: every face of the copy has its subject
    alice = copy.subject_faces(copy.subject(SubjectRef(name="alice")).id)[0]
    assert copy.image(alice.image_sha256) == b"original photo bytes"
    assert copy.store_id != store.store_id  # a copy is a database of its own to the index


def test_a_backup_never_overwrites_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0))
    (tmp_path / "taken.db").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="never overwrites"):
        backup_database(store.path, tmp_path / "taken.db")
    assert (tmp_path / "taken.db").read_bytes() == b"someone else's file"
    with pytest.raises(FileNotFoundError, match="no folder"):
        backup_database(store.path, tmp_path / "missing" / "copy.db")

    def created_meanwhile(partial, dest):  # another backup took the name during the copy
        dest.write_bytes(b"the other one")
        real_publish(partial, dest)

    real_publish = backup_module._publish
    monkeypatch.setattr(backup_module, "_publish", created_meanwhile)
    with pytest.raises(FileExistsError):
        backup_database(store.path, tmp_path / "race.db")
    assert (tmp_path / "race.db").read_bytes() == b"the other one"

    def interrupted(partial, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(backup_module, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backup_database(store.path, tmp_path / "stopped.db")
    assert not (tmp_path / "stopped.db").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_the_partial_copies_a_killed_backup_left_are_removed_by_the_next(tmp_path):
    """kill -9 during a backup left visage-....db.XXXX.partial (the database's size) and its journal for ever."""
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1))
    dest = tmp_path / "backups"
    dest.mkdir()
    abandoned = dest / "visage-20261201T000000Z.db.k9x2ab.partial"
    abandoned.write_bytes((tmp_path / "visage.db").read_bytes())
    journal = dest / f"{abandoned.name}-journal"
    journal.write_bytes(b"journal")
    fresh = dest / "visage-20261201T000100Z.db.q1w2e3.partial"  # another backup, running now
    fresh.write_bytes(abandoned.read_bytes())
    someone_elses = dest / "film.db.download.partial"  # not a database: not ours
    someone_elses.write_bytes(b"half a film")
    checking = dest / "visage-20261130T230000Z.db.z9y8x7.partial"  # a long integrity check: old, but locked
    checking.write_bytes(abandoned.read_bytes())
    old = time.time() - 3600
    for path in (abandoned, journal, someone_elses, checking):
        os.utime(path, (old, old))
    with open(checking, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as backup_database holds its copy
        report = backup_into_folder(tmp_path / "visage.db", dest)
    assert not abandoned.exists() and not journal.exists()
    assert fresh.exists() and someone_elses.exists() and checking.exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [report.path.name, fresh.name, someone_elses.name, checking.name])
    store.close()


def test_sigterm_during_a_backup_is_an_interrupt_so_the_partial_file_is_removed(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1))
    store.close()
    (tmp_path / "backups").mkdir()

    def killed(db_path, partial, unusable):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    monkeypatch.setattr(backup_module, "copy_snapshot", killed)
    assert main(["backup", str(tmp_path / "backups"), "--data-dir", str(tmp_path), "--json"]) == 130
    assert json.loads(capsys.readouterr().out)["error"] == "interrupted"
    assert list((tmp_path / "backups").iterdir()) == []  # no partial file left
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (restored for whatever runs next)


def test_sigterm_while_a_command_starts_is_an_interrupt_too(tmp_path, monkeypatch, capsys):
    """The handler was installed around the main loop only: a SIGTERM while the command loaded its settings or
    its model (2-4 s for enroll and reindex) killed it with 143 and no JSON."""
    import app.commands

    def slow_settings(args, **extra):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(app.commands, "_settings", slow_settings)
    for argv in (["reindex", "--json"], ["enroll", str(tmp_path), "--json"], ["backup", str(tmp_path), "--json"]):
        assert main(argv) == 130, argv
        assert json.loads(capsys.readouterr().out)["error"] == "interrupted"


def test_backups_into_one_folder_within_a_second_get_distinct_names(tmp_path):
    store = Store(tmp_path / "visage.db")
    folder = tmp_path / "backups"
    folder.mkdir()
    names = {backup_into_folder(store.path, folder).path.name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith("visage-") and n.endswith(".db") for n in names)


def test_a_backup_does_not_wait_for_a_writer(tmp_path):
    """The copy reads through a read-only connection: a writer holding the write lock (another process's long
    enrollment) does not delay it, and the backup itself never writes to the live gallery."""
    store = Store(tmp_path / "visage.db")
    add(store, "alice", unit(1, 0))
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta (key, value) VALUES ('uncommitted', 'x')")
    try:
        started = time.monotonic()
        report = backup_database(store.path, tmp_path / "copy.db")
        assert time.monotonic() - started < 5 and report.faces == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert copy.execute("SELECT COUNT(*) FROM meta WHERE key = 'uncommitted'").fetchone()[0] == 0


def test_a_restored_backup_older_than_the_index_gets_the_index_rebuilt(tmp_path):
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1, 0))
    backup_database(gallery.store.path, tmp_path / "backup.db")
    add(gallery.store, "bob", unit(0, 1))
    gallery.close()  # syncs and saves the index: two faces
    restore(tmp_path / "backup.db", tmp_path)
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt") and len(gallery.index) == 1
    gallery.close()


def test_restoring_two_backups_in_turn_never_lets_the_index_answer_for_the_other(tmp_path):
    """b1 restored, a face enrolled, b2 restored: the index saved in between has b2's face ids and generation
    but other vectors. Ids and generations alone loaded it and answered with the wrong person; the database id
    that each backup copy gets of its own makes it a rebuild."""
    gallery = open_gallery(tmp_path)
    for i in range(3):
        add(gallery.store, f"old{i}", unit(*([0] * i), 1))
    backup_database(gallery.store.path, tmp_path / "b1.db")
    for i in range(3, 6):
        add(gallery.store, f"new{i}", unit(*([0] * i), 1))
    backup_database(gallery.store.path, tmp_path / "b2.db")
    gallery.close()
    restore(tmp_path / "b1.db", tmp_path)
    gallery = open_gallery(tmp_path)
    mallory = unit(*([0] * 7), 1)  # orthogonal to everyone in b2
    add(gallery.store, "mallory", mallory)  # face id 4 in this history, new3's id in b2's
    gallery.close()
    restore(tmp_path / "b2.db", tmp_path)
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt (index file was built from another database"), gallery.opened_by
    hits = gallery.identify(mallory[None, :], k=1)[0]
    assert all(hit.similarity < 0.5 for hit in hits), hits  # the stale index answered new3 with 1.0
    assert gallery.agreement()["agree"]
    gallery.close()
