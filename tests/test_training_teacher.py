"""training.teacher: our dlib descriptors reproduce the shipped reference rows; the cache is keyed by hash."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from training.paths import shared_data, teacher_reference
from training.teacher import DlibTeacher, TeacherCache, sha256_file, teacher_embed, teacher_vectors

IMAGES = [
    "lfw/images/Colin_Powell/Colin_Powell_0001.jpg",
    "lfw/images/Joseph_Biden/Joseph_Biden_0001.jpg",
    "lfw/images/Abdoulaye_Wade/Abdoulaye_Wade_0003.jpg",  # dlib finds no face here: the fixed fallback box
    # two faces; the one nearest the centre is not the first
    "lfw/images/Thomas_Van_Essen/Thomas_Van_Essen_0001.jpg",
]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    with np.load(teacher_reference()) as z:
        paths = list(z["paths"])
        rows = {p: paths.index(p) for p in IMAGES}
        return {p: (z["desc"][i], z["desc_flip"][i], bool(z["fallback"][i])) for p, i in rows.items()}


@pytest.fixture(scope="module")
def teacher() -> DlibTeacher:
    return DlibTeacher()


@pytest.mark.parametrize("rel", IMAGES)
def test_descriptors_reproduce_the_reference_rows(teacher, reference, rel):
    desc, desc_flip, fallback = teacher.describe_file(shared_data() / rel)
    ref_desc, ref_flip, ref_fallback = reference[rel]
    assert desc.shape == desc_flip.shape == (128,) and desc.dtype == np.float32
    np.testing.assert_allclose(desc, ref_desc, atol=1e-4)
    np.testing.assert_allclose(desc_flip, ref_flip, atol=1e-4)
    assert fallback == ref_fallback
    assert 1.1 < np.linalg.norm(desc) < 1.8  # dlib's descriptors are not unit vectors
    assert np.linalg.norm(desc - desc_flip) > 1e-3  # the mirrored view is really a second view


def test_reference_has_the_expected_fallback_mix(reference):
    assert [reference[p][2] for p in IMAGES] == [False, False, True, False]


def test_canvas_places_the_crop_at_45_45_on_grey(teacher):
    crop = Image.new("RGB", (160, 160), (10, 200, 30))
    canvas = teacher.canvas(crop)
    assert canvas.shape == (250, 250, 3) and canvas.dtype == np.uint8
    assert tuple(canvas[44, 44]) == (128, 128, 128) and tuple(canvas[45, 45]) == (10, 200, 30)
    assert tuple(canvas[204, 204]) == (10, 200, 30) and tuple(canvas[205, 205]) == (128, 128, 128)


def test_whole_photos_are_described_where_dlib_finds_the_face(teacher):
    """``describe_photo`` (bench/closed_set.py --teacher): ORL faces and Yale frames are not 160 px crops, which
    the canvas needs. On the README's photos, dlib's own rule (distance under 0.6: the same person) holds."""
    def flip_mean(rel: str) -> np.ndarray:
        with Image.open(shared_data() / "photos" / rel) as img:
            plain, mirrored, fallback = teacher.describe_photo(img)
        assert not fallback and plain.shape == (128,)
        return 0.5 * (plain + mirrored)

    obama, obama2, biden = flip_mean("obama.jpg"), flip_mean("obama2.jpg"), flip_mean("biden.jpg")
    assert np.linalg.norm(obama - obama2) < 0.6 < np.linalg.norm(obama - biden)
    with Image.open(shared_data() / "photos" / "nonface" / "chelsea_cat.jpg") as img:
        assert teacher.describe_photo(img)[2]  # no face: the whole frame, said so


def test_cache_save_load_merge(tmp_path):
    desc = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)
    cache = TeacherCache(["a", "b", "c"], desc, -desc)
    path = tmp_path / "sub" / "cache.npz"
    cache.save(path)
    loaded = TeacherCache.load(path)
    assert loaded.keys == ["a", "b", "c"] and np.array_equal(loaded.desc, desc)
    assert np.array_equal(loaded.desc_flip, -desc)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.npz"]  # no temp file left
    merged = loaded.merged(["c", "d"], desc[:2] + 1, desc[:2] - 1)
    assert merged.keys == ["a", "b", "c", "d"]  # a known key is not duplicated ...
    assert np.array_equal(merged.desc[2], desc[2])  # ... nor overwritten
    assert np.array_equal(merged.desc[3], desc[1] + 1) and np.array_equal(merged.desc_flip[3], desc[1] - 1)
    assert merged.index() == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert TeacherCache.empty().desc.shape == (0, 128)


def test_teacher_embed_computes_only_images_missing_from_the_cache(tmp_path, reference):
    known, new = (shared_data() / p for p in IMAGES[:2])
    ref_known, ref_new = reference[IMAGES[0]], reference[IMAGES[1]]
    cache_path = tmp_path / "teacher_cache.npz"
    TeacherCache([sha256_file(known)], ref_known[0][None], ref_known[1][None]).save(cache_path)
    result = teacher_embed([known, new], cache_path, progress=False)
    cache = result.cache
    assert result.computed == 1 and result.failed == {} and result.fallbacks == 0
    index = cache.index()
    assert set(index) == {sha256_file(known), sha256_file(new)}
    assert sha256_file(new) == hashlib.sha256(new.read_bytes()).hexdigest()
    np.testing.assert_allclose(cache.desc[index[sha256_file(new)]], ref_new[0], atol=1e-4)
    np.testing.assert_allclose(cache.desc_flip[index[sha256_file(new)]], ref_new[1], atol=1e-4)
    assert TeacherCache.load(cache_path).keys == cache.keys  # saved
    assert teacher_embed([known, new], cache_path, progress=False).computed == 0


def test_an_unreadable_image_is_listed_and_the_rest_are_kept(tmp_path):
    """One bad file in a large folder must not throw away the descriptors computed around it."""
    good = shared_data() / IMAGES[1]
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    cache_path = tmp_path / "teacher_cache.npz"
    TeacherCache.empty().save(cache_path)
    result = teacher_embed([bad, good], cache_path, progress=False)
    assert result.computed == 1 and list(result.failed) == [str(bad)]
    assert TeacherCache.load(cache_path).keys == [sha256_file(good)] == result.cache.keys
    with pytest.raises(ValueError, match="could not be read by the teacher"):
        teacher_vectors([bad, good], cache_path, progress=False)


def test_photos_that_are_not_160px_crops_and_bombs_are_failures_and_fallbacks_are_counted(tmp_path):
    """The method pastes a 160 px crop where dlib's frame had the face: a whole photo would be described by
    whatever lies in the middle of the canvas (a flag, a curtain) with exit code 0. A decompression bomb was a
    traceback."""
    photos = shared_data() / "photos"
    photo, bomb = photos / "obama.jpg", photos / "edge" / "bad" / "bomb_20000x20000.png"
    blank = tmp_path / "blank.png"
    Image.new("RGB", (160, 160), (128, 128, 128)).save(blank)
    cache_path = tmp_path / "teacher_cache.npz"
    TeacherCache.empty().save(cache_path)
    result = teacher_embed([photo, bomb, blank], cache_path, progress=False)
    assert set(result.failed) == {str(photo), str(bomb)}
    assert "160x160 face crops" in result.failed[str(photo)]
    assert result.computed == 1 and result.fallbacks == 1  # the blank crop: no face, the fixed central box


def test_teacher_embed_on_a_folder_without_images_is_an_error_not_an_empty_success(tmp_path, capsys):
    """It exited 0 with "images: 0" and wrote the whole reference cache (14 MB) for a mistyped folder."""
    from model.console import main

    (tmp_path / "notes.txt").write_text("not a photo")
    cache = tmp_path / "cache.npz"
    assert main(["teacher-embed", str(tmp_path), "--cache", str(cache)]) == 2
    assert "no images in" in capsys.readouterr().err and not cache.exists()


def test_an_interrupt_keeps_the_descriptors_computed_so_far(tmp_path, monkeypatch):
    """A Ctrl-C (or SIGTERM) lost what was computed since the last once-a-minute save."""
    import training.teacher as teacher_module

    class Interrupted(DlibTeacher):  # dlib's own chips; the second batch of 64 is interrupted
        batches = 0

        def describe_chips(self, chips):
            Interrupted.batches += 1
            if Interrupted.batches == 2:
                raise KeyboardInterrupt
            return np.ones((len(chips), 128), np.float32)

    images = sorted((shared_data() / "lfw" / "images").glob("A*/*.jpg"))[:70]
    monkeypatch.setattr(teacher_module, "DlibTeacher", Interrupted)
    monkeypatch.setenv("VISAGE_TEACHER_NPZ", str(tmp_path / "none.npz"))  # no reference rows: all are new
    cache_path = tmp_path / "cache.npz"
    with pytest.raises(KeyboardInterrupt):
        teacher_embed(images, cache_path, progress=False)
    saved = TeacherCache.load(cache_path)
    assert len(saved.keys) == 64 and set(saved.keys) == {sha256_file(p) for p in images[:64]}
