"""Shared fixtures: the real photos in ../shared/data/photos (see its SOURCE.md) and the shipped weights."""

from __future__ import annotations

import os

# One torch thread per process: the suite runs a server and CLI subprocesses beside the test process on
# 2 cores, and torch's spinning OpenMP threads slow each other down by 10-100x when oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from training.paths import shared_data  # noqa: E402

# A suite started in the background (`nohup bash .ci/run &`) inherits SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: the Ctrl-C tests of prepare would test nothing and fail. Give it the usual one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PHOTOS = shared_data() / "photos"


def photo(rel: str) -> Path:
    path = PHOTOS / rel
    if not path.exists():
        raise FileNotFoundError(f"test photo missing: {path} (is ../shared/data beside the repo?)")
    return path


@pytest.fixture(scope="session")
def photos() -> Path:
    return PHOTOS


@pytest.fixture(scope="session")
def pipeline():
    """The shipped default weights + MTCNN: one instance for the whole session (loading costs ~1 s)."""
    from model.faces import load_pipeline

    return load_pipeline()
