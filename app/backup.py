"""``visage backup``: a consistent copy of the gallery's database, taken while the service runs.

Everything the gallery holds (subjects, faces, the stored originals) lives in ``visage.db``; the FAISS index is a
cache of it and needs no backup. The copy is SQLite's online backup of one snapshot, read through a read-only
connection (writers go on in the WAL meanwhile), into a private temporary file beside the destination. It is then
integrity-checked, made self-contained (no ``-wal`` beside it), given a database id of its own (``app.store``:
an index saved from the live database is never trusted over it after a restore), synced, and published with a
hard link, which cannot overwrite a file, even one created at the same moment by a concurrent backup.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.errors import StoreUnreadable
from app.files import remove_stale, sync_folder
from app.store import BUSY_TIMEOUT_S, DAMAGE_ERRORS, new_store_id

NAME_ATTEMPTS = 100  # time-stamped names tried in a folder (-1, -2, ... within one second)


@dataclass(frozen=True)
class BackupReport:
    path: Path
    bytes: int
    subjects: int
    faces: int
    images: int  # stored originals (what `visage reindex` re-embeds from)
    seconds: float


def backup_database(db_path: Path, dest: Path) -> BackupReport:
    """Copy ``db_path`` to the new file ``dest`` (``FileExistsError`` if it exists; never half-written)."""
    started = time.monotonic()
    dest = Path(os.path.abspath(dest))
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"no folder {dest.parent} to write the backup into")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: choose a new name (a backup never overwrites a file)")
    with partial_file(dest.parent, dest.name) as partial:
        counts = copy_snapshot(db_path, partial, unusable="there is nothing sound to back up; restore it from an "
                               "earlier backup")
        _publish(partial, dest)
    subjects, faces, images = counts
    return BackupReport(dest, dest.stat().st_size, subjects, faces, images, time.monotonic() - started)


@contextmanager
def partial_file(folder: Path, name: str) -> Iterator[Path]:
    """A new empty file ``<name>.XXXXXXXX.partial`` in ``folder`` to write a copy into: mkstemp's unique name
    (concurrent copies never share one) and owner-only mode (faces and photos), flock-ed while it is written (so
    that another copy's clean-up leaves it alone), removed with its journal on the way out unless renamed; the
    abandoned ones of earlier copies are removed first."""
    _remove_abandoned_partials(folder)
    fd, partial_name = tempfile.mkstemp(prefix=f"{name}.", suffix=".partial", dir=folder)
    partial = Path(partial_name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield partial
    finally:
        partial.unlink(missing_ok=True)
        Path(f"{partial}-journal").unlink(missing_ok=True)
        os.close(fd)


def _remove_abandoned_partials(folder: Path) -> None:
    """The half-written copies (and their journals) of backups and restores that a kill -9 stopped: Ctrl-C and
    SIGTERM clean up after themselves, a kill cannot. Only SQLite files (or empty ones) named as ``partial_file``
    names them, and none that a running copy holds locked (a long integrity check leaves its copy untouched for
    minutes)."""
    def keep(path: Path) -> bool:
        with open(path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00" and path.stat().st_size > 0:
                return True  # not ours
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # being written
            return False

    for partial in remove_stale(folder, "*.*.partial", keep=keep):
        Path(f"{partial}-journal").unlink(missing_ok=True)


def backup_into_folder(db_path: Path, folder: Path) -> BackupReport:
    """A backup named ``visage-YYYYmmddTHHMMSSZ.db`` in ``folder`` (``-1``, ``-2``, ... when taken within one
    second of another)."""
    stamp = f"visage-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    for n in range(NAME_ATTEMPTS):
        try:
            return backup_database(db_path, folder / (f"{stamp}-{n}.db" if n else f"{stamp}.db"))
        except FileExistsError:
            continue
    raise FileExistsError(f"{NAME_ATTEMPTS} backups named {stamp}*.db already in {folder}")


def copy_snapshot(db_path: Path, partial: Path, unusable: str, at_rest: bool = False) -> tuple[int, int, int]:
    """One snapshot of ``db_path`` into the empty file ``partial``: integrity-checked, with a database id of its
    own, self-contained and synced; returns (subjects, faces, stored images). ``unusable`` ends the message when
    ``db_path`` is not a sound SQLite file (what the caller's user should do about it). Shared by backup and
    restore, so a restored gallery is exactly what a backup of the backup would be. ``at_rest``: no process
    writes ``db_path`` and no log lies beside it, so it is read as immutable: no lock taken and no ``-shm``
    written beside it (a plain copy of a WAL gallery in a read-only folder failed "attempt to write a readonly
    database")."""
    mode = "mode=ro&immutable=1" if at_rest else "mode=ro"
    source = sqlite3.connect(f"{db_path.resolve().as_uri()}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            try:
                source.backup(target)  # one step: a stepped copy starts over each time another connection writes
            except sqlite3.DatabaseError as exc:  # the file itself damaged (a lock or a full disk may pass)
                if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in DAMAGE_ERRORS:
                    raise
                raise StoreUnreadable(f"{db_path} is not a usable SQLite database ({exc}): {unusable}") from exc
            check = target.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise StoreUnreadable(f"the copy of {db_path} failed SQLite's integrity check ({check}): {unusable}")
            counts = target.execute(
                "SELECT (SELECT COUNT(*) FROM subjects), (SELECT COUNT(*) FROM faces), (SELECT COUNT(*) FROM blobs)"
            ).fetchone()
            target.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('store_id', ?)", (new_store_id(),))
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
    finally:
        source.close()
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    return tuple(counts)


def _publish(partial: Path, dest: Path) -> None:
    """Give the finished copy its name: a hard link fails if ``dest`` exists (os.replace would overwrite it);
    then sync the folder so the name survives a power cut."""
    try:
        os.link(partial, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} exists: choose a new name (a backup never overwrites a file)") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race, no longer atomic)
        if dest.exists():
            raise FileExistsError(f"{dest} exists: choose a new name (a backup never overwrites a file)") from None
        os.replace(partial, dest)
    sync_folder(dest.parent)
