"""Output paths checked before the work whose result they hold: a read-only folder, or a file where a folder
should be, found at the save came after minutes of calibrating, embedding or dlib descriptors, as a traceback or
as mkdir's "[Errno 17] File exists: 'x'"."""

from __future__ import annotations

import tempfile
from pathlib import Path


def file_in_the_way(path: Path) -> None:
    """``NotADirectoryError`` naming the file that stands where ``path`` (or a folder above it) should be."""
    nearest = next((p for p in (path, *path.parents) if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise NotADirectoryError(f"{nearest} is a file, not a folder")


def make_parent(path: Path) -> None:
    """``mkdir -p`` of ``path``'s folder, a file in the way named."""
    file_in_the_way(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)


def check_writable(path: Path, what: str) -> None:
    """Raise, naming ``what`` (an option, "the failures list"), the ``OSError`` that writing ``path`` would: a
    folder given for the file, a file in the way, no permission. Makes the folder, writes and removes a probe."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give the file's path")
    try:
        make_parent(path)
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".probe", dir=path.parent):
            pass
    except OSError as exc:
        raise type(exc)(f"cannot write {what} {path}: {exc.strerror or exc}") from None
