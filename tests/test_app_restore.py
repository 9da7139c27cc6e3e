"""``visage restore`` on real SQLite files and a real second process: the backup comes back whole, the replaced
gallery is kept, a gallery in use is never replaced, and nothing but a sound Visage gallery is restored. (Under a
real uvicorn: test_app_e2e.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_helpers import REPO, add, open_gallery, unit

from app import restore as restore_module
from app.backup import backup_database
from app.store import Store
from model.console import main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(db: Path) -> list[str]:
    store = Store(db)
    try:
        return sorted(s.name for s in store.list_subjects(0, 100)[1])
    finally:
        store.close()


def store_id(db: Path) -> str:
    store = Store(db)
    store.close()
    return store.store_id


def restore(tmp_path, backup: Path, capsys) -> tuple[int, dict]:
    code = main(["restore", str(backup), "--data-dir", str(tmp_path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".replaced-" in p.name)


@pytest.fixture
def gallery_with_backup(tmp_path):
    """A gallery of alice and bob (its index saved at close), and a backup taken when it held alice only."""
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1, 0))
    backup = tmp_path / "backups" / "b1.db"
    backup.parent.mkdir()
    backup_database(gallery.store.path, backup)
    add(gallery.store, "bob", unit(0, 1))
    gallery.close()
    return backup


def test_restore_puts_the_backup_back_and_keeps_the_gallery_it_replaced(tmp_path, gallery_with_backup, capsys):
    backup = gallery_with_backup
    before = digest(backup)
    old_id = store_id(tmp_path / "visage.db")
    code, out = restore(tmp_path, backup, capsys)
    assert code == 0, out
    assert (out["subjects"], out["faces"], out["images"]) == (1, 1, 0) and out["path"] == str(tmp_path / "visage.db")
    assert digest(backup) == before  # the backup itself is never written
    assert names(tmp_path / "visage.db") == ["alice"]
    replaced = Path(out["replaced"])
    assert replaced.parent == tmp_path and replaced.name.startswith("visage.db.replaced-")
    assert not Path(f"{replaced}-wal").exists()  # its log was folded in: one self-contained file
    assert names(replaced) == ["alice", "bob"]  # nothing acknowledged is lost
    assert stat.S_IMODE((tmp_path / "visage.db").stat().st_mode) == 0o600
    # an id of its own: restoring b1 twice makes two databases, whose saved indexes never answer for each other
    assert len({store_id(tmp_path / "visage.db"), old_id, store_id(backup)}) == 3
    gallery = open_gallery(tmp_path)
    assert gallery.opened_by.startswith("rebuilt (index file was built from another database"), gallery.opened_by
    assert len(gallery.index) == 1 and gallery.agreement()["agree"]
    gallery.close()
    assert leftovers(tmp_path) == [replaced.name]


def test_restore_is_refused_while_another_process_has_the_gallery_open(tmp_path, gallery_with_backup, capsys):
    """The service, a worker or a batch enrollment still running would write on into the replaced file."""
    db = tmp_path / "visage.db"
    holder = _holder(db)
    try:
        before = digest(db)
        code, out = restore(tmp_path, gallery_with_backup, capsys)
        assert code == 2 and out["error"] == "gallery_in_use", out
        assert "stop it first" in out["detail"] and str(db) in out["detail"]
        assert digest(db) == before and leftovers(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    code, out = restore(tmp_path, gallery_with_backup, capsys)
    assert code == 0, out
    assert names(db) == ["alice"]


def test_only_a_sound_visage_gallery_is_restored(tmp_path, gallery_with_backup, capsys):
    db = tmp_path / "visage.db"
    before = digest(db)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.db"
    newer.write_bytes(gallery_with_backup.read_bytes())
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all, but long enough to be read " * 200)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    cases = [
        (tmp_path / "nowhere.db", "file_not_found", "no backup file"),
        (tmp_path, "file_not_found", "is a folder: give the backup file in it"),
        (garbage, "store_unreadable", "is not a usable SQLite database"),
        (other, "not_a_gallery", "not a Visage gallery"),
        (empty, "not_a_gallery", "not a Visage gallery"),
        (newer, "not_a_gallery", "a gallery of schema 2"),
        (db, "invalid_value", "is the gallery itself"),
    ]
    for backup, error, detail in cases:
        code, out = restore(tmp_path, backup, capsys)
        assert code == 2 and out["error"] == error and detail in out["detail"], (backup.name, out)
        assert digest(db) == before and leftovers(tmp_path) == [], backup.name


def test_restore_over_a_damaged_gallery_keeps_the_damaged_file(tmp_path, gallery_with_backup, capsys):
    """What a restore is usually for: the live file cannot be opened, so it cannot be locked either."""
    db = tmp_path / "visage.db"
    for sidecar in ("visage.db-wal", "visage.db-shm"):
        (tmp_path / sidecar).unlink(missing_ok=True)
    db.write_bytes(b"damaged " * 1000)
    code, out = restore(tmp_path, gallery_with_backup, capsys)
    assert code == 0, out
    assert names(db) == ["alice"] and Path(out["replaced"]).read_bytes() == b"damaged " * 1000


def test_restore_into_a_new_data_folder_that_exists(tmp_path, gallery_with_backup, capsys):
    """A new machine: no gallery to replace. A data folder that is not there is a typo (it was made, by root
    under cron, and the restore "succeeded" where no service looks)."""
    code, out = restore(tmp_path / "fresh", gallery_with_backup, capsys)
    assert code == 2 and out["error"] == "file_not_found" and "no data folder" in out["detail"], out
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "fresh").mkdir()
    code, out = restore(tmp_path / "fresh", gallery_with_backup, capsys)
    assert code == 0 and out["replaced"] is None, out
    assert names(tmp_path / "fresh" / "visage.db") == ["alice"]


def _holder(db: Path) -> subprocess.Popen:
    """Another process with the gallery open (as the service holds it), until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from app.store import Store; s = Store(sys.argv[1]); "
         "print('open', flush=True); time.sleep(120)", str(db)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "open"
    return holder


def test_a_damaged_gallery_still_open_in_another_process_is_not_replaced(tmp_path, gallery_with_backup, capsys):
    """Damage made the WAL switch fail, which was read as "nobody can use it": a service that had it open went
    on writing into the file set aside. The lock on its -shm says who has it open, whatever the damage."""
    db = tmp_path / "visage.db"
    holder = _holder(db)
    try:
        with open(db, "r+b") as fh:
            fh.write(b"damaged header!!")  # SQLite's magic string overwritten under the open connection
        code, out = restore(tmp_path, gallery_with_backup, capsys)
        assert code == 2 and out["error"] == "gallery_in_use", out
        assert leftovers(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "visage.db-wal").write_bytes(b"the log a killed process left")
    code, out = restore(tmp_path, gallery_with_backup, capsys)  # killed: nobody has it open now
    assert code == 0, out
    replaced = Path(out["replaced"])
    assert replaced.read_bytes().startswith(b"damaged header!!") and names(db) == ["alice"]
    assert Path(f"{replaced}-wal").read_bytes() == b"the log a killed process left"  # moved with its file
    assert not (tmp_path / "visage.db-wal").exists() and not (tmp_path / "visage.db-shm").exists()


def test_a_plain_copy_of_a_gallery_restores_without_writing_beside_it(tmp_path, capsys):
    """A copy made with cp of a stopped service's file has the WAL flag in its header: opened read-only in place,
    SQLite wrote -wal and -shm files beside it (and failed in a read-only folder). A copy taken with its -wal
    (the service still running) restores with what that log holds."""
    gallery = open_gallery(tmp_path)
    add(gallery.store, "alice", unit(1, 0))
    gallery.close()
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "plain.db").write_bytes((tmp_path / "visage.db").read_bytes())
    store = Store(tmp_path / "visage.db")
    add(store, "bob", unit(0, 1))  # in the log only, while the store stays open
    (backups / "live.db").write_bytes((tmp_path / "visage.db").read_bytes())
    (backups / "live.db-wal").write_bytes((tmp_path / "visage.db-wal").read_bytes())
    store.close()
    code, out = restore(tmp_path, backups / "plain.db", capsys)
    assert code == 0, out
    assert sorted(p.name for p in backups.iterdir()) == ["live.db", "live.db-wal", "plain.db"]
    assert names(tmp_path / "visage.db") == ["alice"]
    code, out = restore(tmp_path, backups / "live.db", capsys)
    assert code == 0, out
    assert names(tmp_path / "visage.db") == ["alice", "bob"]


def test_an_interrupt_during_the_swap_waits_and_the_restore_is_reported_done(tmp_path, gallery_with_backup,
                                                                           monkeypatch, capsys, caplog):
    """A SIGTERM that came after the swap made the command say "interrupted" (exit 130) although the gallery was
    already replaced."""
    keep_aside = restore_module._keep_aside

    def interrupted(db_path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the signal arrives here, in the middle of the swap
        return keep_aside(db_path)

    monkeypatch.setattr(restore_module, "_keep_aside", interrupted)
    code, out = restore(tmp_path, gallery_with_backup, capsys)
    assert code == 0 and out["replaced"], out
    assert names(tmp_path / "visage.db") == ["alice"] and "SIGTERM came while" in caplog.text


def test_sigterm_during_a_restore_leaves_the_gallery_and_no_partial_file(tmp_path, gallery_with_backup,
                                                                          monkeypatch, capsys):
    db = tmp_path / "visage.db"
    before = digest(db)

    def killed(source, partial, unusable, at_rest):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    monkeypatch.setattr(restore_module, "copy_snapshot", killed)
    code, out = restore(tmp_path, gallery_with_backup, capsys)
    assert code == 130 and out["error"] == "interrupted"
    assert digest(db) == before and leftovers(tmp_path) == []
    assert names(db) == ["alice", "bob"]
