"""``visage restore``: put a backup back as the gallery, keeping the database it replaces.

The manual steps (docs/SERVICE.md) could go wrong three ways, each silently: restoring under a running writer (its
later writes went into the replaced file and were lost), keeping the replaced file's ``-wal`` (SQLite replayed it
onto the copy: a damaged gallery, or a restore that did not take) and a copy left owned by root. Here each step is
done, in an order where a crash at any point leaves ``visage.db`` whole (the old one or the new one):

1. the backup is copied (never modified) through ``app.backup.copy_snapshot``: integrity-checked, checked to be a
   Visage gallery of a schema this version reads, given a database id of its own (so the saved index, built from
   another database, is rebuilt), into a private temporary file beside the gallery;
2. the live gallery is taken out of use: switching it out of WAL mode needs every other connection closed, so it
   fails while the service, a worker, ``visage enroll`` or ``visage reindex`` has it open (and folds its log
   into it); an exclusive lock then holds it until the swap;
3. the live file gets a second name, ``visage.db.replaced-<stamp>`` (kept: nothing acknowledged is ever lost), and
   the copy takes the name ``visage.db`` in one rename.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.backup import copy_snapshot
from app.files import private_dir, remove_stale, sync_folder
from app.store import DAMAGE_ERRORS, SCHEMA_VERSION, Store
from model.errors import VisageError

LOCK_WAIT_S = 2.0  # a writer's transaction ends in milliseconds; an open connection never lets go
NAME_ATTEMPTS = 100


class GalleryInUse(VisageError):
    """Another process has the gallery open: restoring under it would lose what it writes next."""

    code = "gallery_in_use"
    status = 409


class NotAGallery(VisageError):
    """The file to restore is an SQLite database, but not one of Visage's galleries (or of a newer schema)."""

    code = "not_a_gallery"
    status = 422


@dataclass(frozen=True)
class RestoreReport:
    path: Path
    replaced: Path | None  # where the gallery that was replaced is kept (None: there was none)
    subjects: int
    faces: int
    images: int
    seconds: float


def restore_database(backup: Path, db_path: Path) -> RestoreReport:
    """Make a copy of ``backup`` the gallery at ``db_path``; the gallery it replaces is kept beside it."""
    started = time.monotonic()
    backup, db_path = Path(os.path.abspath(backup)), Path(os.path.abspath(db_path))
    if not backup.is_file():
        raise FileNotFoundError(f"no backup file {backup}")
    if db_path.exists() and os.path.samefile(backup, db_path):
        raise ValueError(f"{backup} is the gallery itself: give a backup (visage backup DEST writes one)")
    folder = private_dir(db_path.parent)
    remove_stale(folder, f"{db_path.name}.restore-*.partial")  # left by a kill -9 (Ctrl-C cleans up)
    fd, partial_name = tempfile.mkstemp(prefix=f"{db_path.name}.restore-", suffix=".partial", dir=folder)
    os.close(fd)
    partial = Path(partial_name)
    try:
        try:
            counts = copy_snapshot(backup, partial, unusable="choose another backup")
        except sqlite3.OperationalError as exc:  # an empty file, or another program's database
            if "no such table" not in str(exc):
                raise
            raise NotAGallery(f"{backup} is not a Visage gallery ({exc})") from exc
        _check_schema(backup, partial)
        _same_owner(partial, db_path)
        lock = _take_out_of_use(db_path)
        try:
            replaced = _keep_aside(db_path) if db_path.exists() else None
            os.replace(partial, db_path)
            sync_folder(folder)
        finally:
            if lock is not None:
                lock.close()  # (its file is the replaced one now)
    finally:
        partial.unlink(missing_ok=True)
        Path(f"{partial}-journal").unlink(missing_ok=True)
    Store(db_path).close()  # opens as the service will: migrates an older backup, proves it usable
    subjects, faces, images = counts
    return RestoreReport(db_path, replaced, subjects, faces, images, time.monotonic() - started)


def _check_schema(backup: Path, copy: Path) -> None:
    conn = sqlite3.connect(copy)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # (copy_snapshot's count already needed subjects, faces and blobs)
        row = None
    finally:
        conn.close()
    if row is None:
        raise NotAGallery(f"{backup} is an SQLite database but not a Visage gallery (no schema version)")
    if row[0] != SCHEMA_VERSION:
        raise NotAGallery(f"{backup} is a gallery of schema {row[0]}, which this version of Visage (schema "
                          f"{SCHEMA_VERSION}) cannot read: restore it with the version that wrote it")


def _same_owner(copy: Path, db_path: Path) -> None:
    """The copy is the service's file from now on: root restoring it (a cron job, ``docker compose run``) must not
    leave it unwritable by the service's user."""
    if not db_path.exists() or os.geteuid() != 0:
        return
    st = db_path.stat()
    os.chown(copy, st.st_uid, st.st_gid)


def _take_out_of_use(db_path: Path) -> sqlite3.Connection | None:
    """A connection holding the live gallery's exclusive lock, out of WAL mode; ``GalleryInUse`` if any other
    connection has it open. None when there is no gallery, or one too damaged to lock (nothing can use it)."""
    if not db_path.exists():
        return None
    conn = sqlite3.connect(db_path, timeout=LOCK_WAIT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")  # needs every other connection closed
        conn.execute("BEGIN EXCLUSIVE")  # in rollback mode, no reader either until the swap is done
    except sqlite3.DatabaseError as exc:
        conn.close()
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in DAMAGE_ERRORS:
            return None
        if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
            raise GalleryInUse(
                f"{db_path} is open in another process (the service, one of its workers, visage enroll or visage "
                "reindex): stop it first, or what it writes after the restore goes into the replaced file"
            ) from exc
        raise
    return conn


def _keep_aside(db_path: Path) -> Path:
    """A second name for the live gallery, ``<name>.replaced-<stamp>``, never overwriting a file; a log a damaged
    one still has (SQLite finds it by name) moves with it, and its shared-memory index goes."""
    stamp = f"{db_path.name}.replaced-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    for n in range(NAME_ATTEMPTS):
        kept = db_path.with_name(f"{stamp}-{n}" if n else stamp)
        try:
            os.link(db_path, kept)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{NAME_ATTEMPTS} files named {stamp}* already beside {db_path}")
    for suffix in ("-wal", "-journal"):
        log = Path(f"{db_path}{suffix}")
        if log.exists():
            os.replace(log, f"{kept}{suffix}")
    Path(f"{db_path}-shm").unlink(missing_ok=True)
    return kept
