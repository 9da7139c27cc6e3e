"""``visage restore``: put a backup back as the gallery, keeping the database it replaces.

The manual steps (docs/SERVICE.md) could go wrong three ways, each silently: restoring under a running writer (its
later writes went into the replaced file and were lost), keeping the replaced file's ``-wal`` (SQLite replayed it
onto the copy: a damaged gallery, or a restore that did not take) and a copy left owned by root. Here each step is
done, in an order where a crash at any point leaves ``visage.db`` whole (the old one or the new one):

1. the backup is copied (never written, nor anything beside it) through ``app.backup.copy_snapshot``:
   integrity-checked, checked to be a Visage gallery of a schema this version reads, given a database id of its
   own (so the saved index, built from another database, is rebuilt), into a private temporary file beside the
   gallery;
2. the live gallery is taken out of use: switching it out of WAL mode needs every other connection closed, so it
   fails while the service, a worker, ``visage enroll``, ``reindex`` or ``backup`` has it open (and folds its log
   into it); an exclusive lock then holds it until the swap. A damaged gallery cannot be switched: the lock every
   WAL connection holds on its ``-shm`` file says whether anyone has it open;
3. the live file gets a second name, ``visage.db.replaced-<stamp>`` (kept: nothing acknowledged is ever lost), and
   the copy takes the name ``visage.db`` in one rename. From the lock on, SIGINT and SIGTERM wait: once the
   gallery is replaced, the restore is finished and reported, never called interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.backup import copy_snapshot, partial_file
from app.files import sync_folder
from app.store import DAMAGE_ERRORS, SCHEMA_VERSION, Store
from model.errors import VisageError
from model.processes import interrupts_deferred

LOCK_WAIT_S = 2.0  # a writer's transaction ends in milliseconds; an open connection never lets go
NAME_ATTEMPTS = 100
SHM_DMS_BYTE = 128  # SQLite's unix VFS: every connection with the WAL index open holds a read lock on this byte


class GalleryInUse(VisageError):
    """Another process has the gallery open: restoring under it would lose what it writes next."""

    code = "gallery_in_use"
    status = 409


class NotAGallery(VisageError):
    """The file to restore is an SQLite database, but not one of Visage's galleries (or of a newer schema)."""

    code = "not_a_gallery"
    status = 422


class RestoredNotOpened(VisageError):
    """The backup is in place, but opening it as the service will (and migrating it) failed."""

    code = "restored_but_not_opened"
    status = 500


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
        raise FileNotFoundError(f"{backup} is a folder: give the backup file in it" if backup.is_dir() else
                                f"no backup file {backup}")
    folder = db_path.parent
    if not folder.is_dir():  # a mistyped --data-dir: a gallery nobody would serve (made by root, unreadable to all)
        raise FileNotFoundError(f"no data folder {folder}: check --data-dir / VISAGE_DATA_DIR (to restore onto a "
                                "new machine, create it first, owned by the service's user)")
    if db_path.exists() and os.path.samefile(backup, db_path):
        raise ValueError(f"{backup} is the gallery itself: give a backup (visage backup DEST writes one)")
    with partial_file(folder, f"{db_path.name}.restore") as partial:
        counts = _copy_backup(backup, partial)
        _same_owner(partial, db_path)
        with interrupts_deferred(then_raise=False):
            lock = _take_out_of_use(db_path)
            try:
                replaced = _keep_aside(db_path) if db_path.exists() else None
                os.replace(partial, db_path)
                sync_folder(folder)
            finally:
                if lock is not None:
                    lock.close()  # (its file is the replaced one now)
            _open_once(db_path, replaced)
    subjects, faces, images = counts
    return RestoreReport(db_path, replaced, subjects, faces, images, time.monotonic() - started)


def _open_once(db_path: Path, replaced: Path | None) -> None:
    """Open the restored gallery as the service will: migrates a backup of an older version, proves it usable. A
    failure here comes after the swap, so it says what is where."""
    try:
        Store(db_path).close()
    except (VisageError, sqlite3.Error, OSError) as exc:
        kept = f" (the gallery it replaced is kept as {replaced})" if replaced else ""
        raise RestoredNotOpened(f"the backup is restored as {db_path}{kept}, but opening it failed: {exc}") from exc


def _copy_backup(backup: Path, partial: Path) -> tuple[int, int, int]:
    """``copy_snapshot`` of the backup, which must be a Visage gallery of this schema. A backup is at rest, read
    as immutable, unless a log lies beside it (a plain copy of ``visage.db`` with its ``-wal``: its writes are in
    that log)."""
    at_rest = not Path(f"{backup}-wal").exists()
    try:
        counts = copy_snapshot(backup, partial, unusable="choose another backup", at_rest=at_rest)
    except sqlite3.OperationalError as exc:  # an empty file, or another program's database
        if "no such table" not in str(exc):
            raise
        raise NotAGallery(f"{backup} is not a Visage gallery ({exc})") from exc
    conn = sqlite3.connect(partial)
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
    return counts


def _same_owner(copy: Path, db_path: Path) -> None:
    """The copy is the service's file from now on: root restoring it (a cron job, ``docker compose run``) must not
    leave it unwritable by the service's user (the gallery's owner, or the data folder's when there is none)."""
    if os.geteuid() != 0:
        return
    st = (db_path if db_path.exists() else db_path.parent).stat()
    os.chown(copy, st.st_uid, st.st_gid)


def _in_use_message(db_path: Path) -> str:
    return (f"{db_path} is open in another process (the service, one of its workers, visage enroll, reindex or "
            "backup): stop it first, or what it writes after the restore goes into the replaced file")


def _take_out_of_use(db_path: Path) -> sqlite3.Connection | None:
    """A connection holding the live gallery's exclusive lock, out of WAL mode; ``GalleryInUse`` if any other
    connection has it open. None when there is no gallery, or one too damaged to lock and open nowhere else."""
    if not db_path.exists():
        return None
    if _unreadable(db_path):  # (before any connection: the last one to close deletes the -wal, a damaged one's too)
        if _wal_index_held(db_path):  # damaged under a process that still has it open
            raise GalleryInUse(_in_use_message(db_path))
        return None
    conn = sqlite3.connect(db_path, timeout=LOCK_WAIT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")  # needs every other connection closed
        conn.execute("BEGIN EXCLUSIVE")  # in rollback mode, no reader either until the swap is done
    except sqlite3.DatabaseError as exc:
        conn.close()
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
            raise GalleryInUse(_in_use_message(db_path)) from exc
        if code not in DAMAGE_ERRORS:
            raise
        if _wal_index_held(db_path):  # damaged under a process that still has it open
            raise GalleryInUse(_in_use_message(db_path)) from exc
        return None
    return conn


def _unreadable(db_path: Path) -> bool:
    """Whether SQLite refuses the file as damaged or not a database, asked without a lock and without creating,
    changing or deleting anything beside it (``immutable``)."""
    conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF in DAMAGE_ERRORS:
            return True
        raise
    finally:
        conn.close()
    return False


def _wal_index_held(db_path: Path) -> bool:
    """Whether another process has the gallery open, read from its ``-shm`` file's lock (SQLite's "DMS" byte,
    which every WAL connection holds shared): no damage to the database file changes that lock."""
    try:
        fd = os.open(f"{db_path}-shm", os.O_RDWR)
    except FileNotFoundError:
        return False  # (the last connection to close deletes it)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_BYTE)
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHM_DMS_BYTE)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


def _keep_aside(db_path: Path) -> Path:
    """A second name for the live gallery, ``<name>.replaced-<stamp>``, never overwriting a file; a log a damaged
    one still has (SQLite finds it by name) moves with it, and its shared-memory index goes."""
    stamp = f"{db_path.name}.replaced-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    for n in range(NAME_ATTEMPTS):
        kept = db_path.with_name(f"{stamp}-{n}" if n else stamp)
        if _second_name(db_path, kept):
            break
    else:
        raise FileExistsError(f"{NAME_ATTEMPTS} files named {stamp}* already beside {db_path}")
    for suffix in ("-wal", "-journal"):
        sidecar = Path(f"{db_path}{suffix}")
        if sidecar.exists():
            os.replace(sidecar, f"{kept}{suffix}")
    Path(f"{db_path}-shm").unlink(missing_ok=True)
    return kept


def _second_name(db_path: Path, kept: Path) -> bool:
    """``kept`` made a name of the live file (False: taken). A hard link; where the file system has none, a
    synced copy (never a rename: ``visage.db`` must not be missing for a moment)."""
    try:
        os.link(db_path, kept)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    try:
        with open(db_path, "rb") as src, open(kept, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
    except FileExistsError:
        return False
    return True
