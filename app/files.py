"""The data folder's permissions: it holds face images, their embeddings and the API key (biometric data, in
GDPR's words a special category), so what Visage creates there is for its own user only, whatever the umask."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("visage.files")


def private_dir(path: Path) -> Path:
    """``mkdir -p``, the folder itself made 0700 when this call creates it (an existing one is left as it is)."""
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
