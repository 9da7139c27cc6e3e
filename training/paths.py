"""Where the shared face data lives: ``../shared/data`` beside the repo, or ``$VISAGE_SHARED_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("VISAGE_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def teacher_reference() -> Path:
    """dlib descriptors of every LFW/CelebA training image, shipped beside the repo (never copied into it)."""
    return Path(os.environ.get("VISAGE_TEACHER_NPZ") or shared_data() / "teacher" / "dlib_resnet_v1.npz")


def work_dir() -> Path:
    """Prepared crops, caches, runs: ``$VISAGE_WORK_DIR`` or ``<repo>/data/work`` (git-ignored)."""
    return Path(os.environ.get("VISAGE_WORK_DIR") or REPO_ROOT / "data" / "work")


def read_text(path: str | Path, what: str) -> str:
    """A text file the user named (a config, a pairs file): one that is not UTF-8 is an error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a {what}: not UTF-8 text (byte {exc.start})") from None
