"""app.files: what Visage writes in the data folder (face images, embeddings, the API key) is its user's only."""

from __future__ import annotations

import logging
import os
import sqlite3

from app_helpers import add, unit

from app.files import private_dir
from app.index import FaceIndex, IndexConfig
from app.settings import Settings, resolve_api_keys
from app.store import Store


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_gallery_is_readable_by_its_user_only_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # the usual default: files 0644, folders 0755
    try:
        data = tmp_path / "data"
        store = Store(data / "visage.db")
        add(store, "alice", unit(1, 0), image=b"the original photo")
        FaceIndex(8, IndexConfig(), "v1").save(data / "index.faiss")
        resolve_api_keys(Settings(data_dir=data))
        assert mode(data) == 0o700
        for name in ("visage.db", "visage.db-wal", "visage.db-shm", "index.faiss", "api_key"):
            assert mode(data / name) == 0o600, name
        store.close()
    finally:
        os.umask(old)


def test_an_existing_database_open_to_others_is_reported_not_changed(tmp_path, caplog):
    path = tmp_path / "visage.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="visage.files"):
        Store(path).close()
    assert mode(path) == 0o644 and "open to other users (mode 644)" in caplog.text
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    assert private_dir(shared) == shared and mode(shared) == 0o755  # an existing folder is left alone


def test_a_database_symlinked_elsewhere_is_created_at_the_links_target(tmp_path):
    """A data folder whose visage.db links to another disk (the target not made yet): created there, 0600."""
    target = tmp_path / "big-disk" / "visage.db"
    target.parent.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "visage.db").symlink_to(target)
    store = Store(data / "visage.db")
    add(store, "alice", unit(1, 0))
    store.close()
    assert target.is_file() and mode(target) == 0o600
    direct = Store(target)
    assert direct.counts("model-v1")["faces"] == 1
    direct.close()
