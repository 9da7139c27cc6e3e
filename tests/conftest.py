"""Shared fixtures: the real photos in ../shared/data/photos (see its SOURCE.md) and the shipped weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.paths import shared_data

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
