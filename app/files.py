"""The data folder's permissions: it holds face images, their embeddings and the API key (biometric data, in
GDPR's words a special category), so what Visage creates there is for its own user only, whatever the umask."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from model.files import file_in_the_way

log = logging.getLogger("visage.files")


def private_dir(path: Path) -> Path:
    """``mkdir -p``, the folder itself made 0700 when this call creates it (an existing one is left as it is)."""
    file_in_the_way(path)  # (mkdir's own message was "[Errno 17] File exists: 'x'")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (SQLite gives its -wal and -shm files the
    database's mode); warn, without changing it, when an existing one is readable by others."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)  # (the mode applies only if it creates; follows symlinks)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    if mode & 0o077:
        log.warning("%s is open to other users (mode %03o) and holds face data: chmod 600 it", path, mode)


# a writer renames or removes its temp file within seconds (or keeps writing to it); one left alone this long was
# abandoned by a killed process (kill -9, the OOM killer, docker stop's SIGKILL during a long index save)
STALE_AFTER_S = 600


def remove_stale(folder: Path, pattern: str, keep=lambda path: False) -> list[Path]:
    """Delete the files in ``folder`` matching ``pattern`` untouched for ``STALE_AFTER_S`` (unless ``keep``
    says otherwise): nothing else ever would, and each can be as large as what it was a copy of."""
    removed = []
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if now - path.stat().st_mtime < STALE_AFTER_S or not path.is_file() or keep(path):
                continue
            path.unlink()
        except OSError:  # gone meanwhile (another worker's clean-up), or not ours to remove: leave it
            continue
        removed.append(path)
        log.info("removed %s, left by an interrupted write", path)
    return removed


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a name just given in it (a rename, a link) survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
