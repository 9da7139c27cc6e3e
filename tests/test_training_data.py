"""training.data: prepared crops in memory, labels, teacher targets, and the batch augmentation."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import crops_to_tensor
from training.data import Augment, concat, load_prepared
from training.prepare import MANIFEST, ManifestRow
from training.teacher import TeacherCache


def write_prepared(folder, rows: list[tuple[str, str, str]]) -> dict[str, np.ndarray]:
    """A hand-made ``visage prepare`` output: (identity, file stem, status) -> crops/<identity>/<stem>.png."""
    rng = np.random.default_rng(0)
    pixels = {}
    with (folder / MANIFEST).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in dataclasses.fields(ManifestRow)])
        writer.writeheader()
        for ident, stem, status in rows:
            source = f"{ident}/{stem}.jpg"
            crop = ""
            if status != "failed":
                crop = f"crops/{ident}/{stem}.png"
                (folder / crop).parent.mkdir(parents=True, exist_ok=True)
                pixels[source] = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
                Image.fromarray(pixels[source]).save(folder / crop)
            writer.writerow(
                dataclasses.asdict(ManifestRow(crop, ident, source, f"sha-{stem}", status, 0.99, ""))
            )
    return pixels


ROWS = [
    ("Bob", "Bob_0001", "detected"),
    ("Ann", "Ann_0001", "detected"),
    ("Ann", "Ann_0002", "fallback"),
    ("Ann", "Ann_0003", "failed"),
    ("Cy", "Cy_0001", "detected"),
]


@pytest.fixture
def folder(tmp_path):
    pixels = write_prepared(tmp_path, ROWS)
    return tmp_path, pixels


def test_load_prepared_reads_every_usable_crop(folder):
    path, pixels = folder
    faces = load_prepared(path, "lfw")
    assert len(faces) == 4 and faces.crops.shape == (4, 112, 112, 3) and faces.crops.dtype == np.uint8
    assert faces.sources == ["Bob/Bob_0001.jpg", "Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Cy/Cy_0001.jpg"]
    assert faces.identities == ["lfw/Bob", "lfw/Ann", "lfw/Ann", "lfw/Cy"]
    assert faces.fallback.tolist() == [False, False, True, False]
    assert faces.sha256[0] == "sha-Bob_0001"
    for crop, source in zip(faces.crops, faces.sources, strict=True):
        assert np.array_equal(crop, pixels[source])
    assert faces.labels.tolist() == [1, 0, 0, 2]  # identities numbered in sorted order
    assert (path / "crops.npy").is_file()
    again = load_prepared(path)  # from the .npy cache
    assert np.array_equal(again.crops, faces.crops) and again.identities[0] == "Bob"


def test_a_crops_cache_cut_short_is_rebuilt(folder):
    """A crops.npy cut short (a full disk, kill -9 during its first write) failed every later run with "mmap length
    is greater than file size", naming no file; it is now read as missing and written again, atomically."""
    path, _ = folder
    faces = load_prepared(path)
    cache = path / "crops.npy"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    again = load_prepared(path)
    assert np.array_equal(again.crops, faces.crops)
    assert np.array_equal(np.load(cache), faces.crops) and not list(path.glob("*.tmp"))


def test_load_prepared_without_crops(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prepared(tmp_path)


def test_subset_concat_and_teacher_targets(folder):
    path, _ = folder
    faces = load_prepared(path, "x")
    keys = ["sha-Cy_0001", "sha-Ann_0001", "sha-Bob_0001", "sha-Ann_0002", "sha-unused"]
    desc = np.arange(5 * 128, dtype=np.float32).reshape(5, 128)
    faces.with_teacher(TeacherCache(keys, desc, -desc))
    assert faces.teacher[0, 0] == desc[2, 0] and faces.teacher[3, 0] == desc[0, 0]  # matched by image hash
    assert np.array_equal(faces.teacher_flip, -faces.teacher)
    ann = faces.subset(np.array([i == "x/Ann" for i in faces.identities]))
    assert ann.sources == ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg"]
    assert np.array_equal(ann.teacher, faces.teacher[1:3]) and np.array_equal(ann.crops, faces.crops[1:3])
    both = concat([ann, faces])
    assert len(both) == 6 and both.teacher.shape == (6, 128) and both.sources[2] == "Bob/Bob_0001.jpg"
    with pytest.raises(ValueError, match="no teacher descriptor"):
        load_prepared(path).with_teacher(TeacherCache(keys[:2], desc[:2], desc[:2]))


def test_concat_drops_teacher_targets_unless_every_part_has_them(folder):
    path, _ = folder
    with_teacher = load_prepared(path)
    with_teacher.teacher = with_teacher.teacher_flip = np.zeros((4, 128), np.float32)
    assert concat([with_teacher, load_prepared(path)]).teacher is None


def test_augment_with_everything_off_is_the_plain_input():
    crops = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    off = Augment(flip=0.0, max_shift=0.0, max_scale=0.0, max_rotate_deg=0.0, colour=0.0, grey=0.0)
    x, flipped = off(crops, 112, torch.Generator().manual_seed(0))
    assert not flipped.any()
    assert torch.allclose(x, crops_to_tensor(crops, 112), atol=1e-4)
    mirror = dataclasses.replace(off, flip=1.0)
    x, flipped = mirror(crops, 112, torch.Generator().manual_seed(0))
    assert flipped.all() and torch.allclose(x, crops_to_tensor(crops, 112).flip(3), atol=1e-4)
    grey = dataclasses.replace(off, grey=1.0)
    x, _ = grey(crops, 112, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_augment_is_reproducible_and_keeps_the_shape():
    crops = np.random.default_rng(2).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    a, fa = Augment()(crops, 96, torch.Generator().manual_seed(5))
    b, fb = Augment()(crops, 96, torch.Generator().manual_seed(5))
    c, _ = Augment()(crops, 96, torch.Generator().manual_seed(6))
    assert a.shape == (8, 3, 96, 96) and a.is_contiguous()
    assert torch.equal(a, b) and torch.equal(fa, fb) and not torch.equal(a, c)
    assert 0 < fa.sum() < 8  # about half mirrored
