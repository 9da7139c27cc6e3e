"""training.views: the student's and the teacher's views of one augmented photo, checked on real photos
against what ``visage prepare`` and dlib produce for the un-augmented photo."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from model.align import ARCFACE_TEMPLATE
from model.preprocess import crops_to_tensor
from training.data import Augment, load_prepared, load_sources
from training.dlib_resnet import CHIP_SIZE
from training.paths import shared_data, teacher_reference
from training.prepare import prepare
from training.teacher import DlibTeacher, teacher_chip_matrices, teacher_network
from training.views import (
    ViewAugment,
    ViewSource,
    chip_matrix,
    chip_to_crop,
    student_matrix,
    student_view_as_chip,
)

LFW = shared_data() / "lfw" / "images"
PEOPLE = ["Colin_Powell", "Serena_Williams", "Abdoulaye_Wade"]  # Wade_0003: dlib's fallback box
STILL = ViewAugment(Augment(flip=0, max_shift=0, max_scale=0, max_rotate_deg=0, colour=0, grey=0))
MIRROR = ViewAugment(Augment(flip=1, max_shift=0, max_scale=0, max_rotate_deg=0, colour=0, grey=0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    for name in PEOPLE:
        shutil.copytree(LFW / name, root / "src" / name)
    prepare(root / "src", root / "prepared", workers=1, progress=False)
    faces = load_prepared(root / "prepared", "lfw")
    faces = faces.subset(np.arange(len(faces)) < 12)
    paths = [root / "src" / s for s in faces.sources]
    views = ViewSource(
        load_sources(paths, faces.sha256, root / "cache" / "sources.npy"),
        np.stack([student_matrix(m) for m in faces.landmarks]),
        teacher_chip_matrices(paths, root / "cache" / "chips.npz", progress=False),
    )
    with np.load(teacher_reference()) as z:
        rows = {p: i for i, p in enumerate(z["paths"])}
        idx = [rows[f"lfw/images/{s}"] for s in faces.sources]
        ref, ref_flip = z["desc"][idx], z["desc_flip"][idx]
    return faces, views, ref, ref_flip


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def teacher_of(chips: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return teacher_network()(chips).numpy()


def test_prepare_records_the_landmarks_it_aligned_on(setup):
    faces, _, _, _ = setup
    assert faces.landmarks.shape == (12, 5, 2) and not np.isnan(faces.landmarks).any()
    assert (faces.landmarks > 0).all() and (faces.landmarks < 160).all()  # source pixels, not the padded canvas


def test_unaugmented_views_are_the_serving_crop_and_dlibs_own_chip(setup):
    faces, views, ref, _ = setup
    x, chips, mixed = views.draw(np.arange(12), 112, STILL, torch.Generator().manual_seed(0))
    assert x.shape == (12, 3, 112, 112) and chips.shape == (12, 3, CHIP_SIZE, CHIP_SIZE) and not mixed.any()
    # the same alignment as prepare's crop (bilinear resampling differs by about one grey level)
    assert float((x - crops_to_tensor(faces.crops, 112)).abs().mean()) * 128 < 2.0
    # and the teacher's answer for the chip is the shipped reference descriptor of the photo
    assert cosine(teacher_of(chips), ref).min() > 0.9999


def test_a_mirrored_view_is_mirrored_for_both(setup):
    faces, views, _, ref_flip = setup
    x, chips, _ = views.draw(np.arange(12), 112, MIRROR, torch.Generator().manual_seed(0))
    assert float((x - crops_to_tensor(faces.crops, 112).flip(3)).abs().mean()) * 128 < 2.0
    # dlib re-detects on the mirrored photo; our chip mirrors its framing: close, not identical
    assert cosine(teacher_of(chips), ref_flip).mean() > 0.98


def test_the_mirror_target_is_dlibs_flip_mean_and_the_same_for_a_view_and_its_mirror(setup):
    """teacher_mirror: the target of a chip is the mean of the teacher's descriptors of it and of its mirror, so a
    view and its mirror image get one target, the photo's flip-mean descriptor of the shipped reference."""
    from training.loop import describe

    _, views, ref, ref_flip = setup
    _, chips, _ = views.draw(np.arange(12), 112, STILL, torch.Generator().manual_seed(0))
    net = teacher_network()
    with torch.no_grad():
        mean, of_mirror = describe(net, chips, mirror=True), describe(net, chips.flip(-1), mirror=True)
        plain, mirrored = describe(net, chips, mirror=False), describe(net, chips.flip(-1), mirror=False)
    assert torch.allclose(mean, (plain + mirrored) / 2, atol=1e-5)
    assert torch.allclose(mean, of_mirror, atol=1e-5)
    assert cosine(mean.numpy(), (ref + ref_flip) / 2).min() > 0.99
    assert cosine(plain.numpy(), mirrored.numpy()).min() < 0.999  # (so the mean is not the plain descriptor)


def test_chip_matrix_is_dlibs_chip_mapping():
    import dlib
    from PIL import Image

    teacher = DlibTeacher()
    with Image.open(LFW / "Colin_Powell" / "Colin_Powell_0001.jpg") as img:
        canvas = teacher.canvas(img)
    shape = teacher.shape(canvas, teacher.face_rect(canvas))
    d = dlib.get_face_chip_details(shape, CHIP_SIZE, 0.25)
    m = chip_matrix((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.angle)
    chip = dlib.get_face_chip(canvas, shape, CHIP_SIZE, 0.25).astype(np.float32)
    inv = np.linalg.inv(m)
    ys, xs = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    src = inv @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    xi, yi = np.round(src[0]).astype(int), np.round(src[1]).astype(int)  # nearest pixel is enough to compare
    diff = np.abs(canvas[yi, xi].astype(np.float32) - chip.reshape(-1, 3))
    assert diff.mean() < 6.0


def test_augmented_views_match_each_other_and_vary(setup):
    _, views, ref, _ = setup
    gen = torch.Generator().manual_seed(1)
    x1, chips1, _ = views.draw(np.arange(12), 112, ViewAugment(), gen)
    x2, chips2, _ = views.draw(np.arange(12), 112, ViewAugment(), gen)
    assert float((x1 - x2).abs().mean()) > 0.02  # fresh randomness each batch
    # the teacher still recognises each augmented face as the photo's own (jitter is small)...
    d1 = teacher_of(chips1)
    assert cosine(d1, ref).mean() > 0.9
    # ... and the student view is the same picture: its grey level tracks the chip's
    s_mean = (x1.mean(dim=(1, 2, 3)) * 128 + 127.5).numpy()
    t_mean = chips1.mean(dim=(1, 2, 3)).numpy()
    assert np.corrcoef(s_mean, t_mean)[0, 1] > 0.9


def test_mixup_blends_the_same_pairs_in_both_views(setup):
    _, views, _, _ = setup
    plain_x, plain_chips, _ = views.draw(np.arange(12), 112, STILL, torch.Generator().manual_seed(2))
    mix = ViewAugment(STILL.base, mixup=0.5)
    x, chips, mixed = views.draw(np.arange(12), 112, mix, torch.Generator().manual_seed(2))
    assert 0 < int(mixed.sum()) < 12
    assert torch.allclose(x[~mixed], plain_x[~mixed], atol=1e-5)
    assert torch.allclose(chips[~mixed], plain_chips[~mixed], atol=1e-3)
    changed_s = (x - plain_x).abs().mean(dim=(1, 2, 3)) > 1e-3
    changed_t = (chips - plain_chips).abs().mean(dim=(1, 2, 3)) > 1e-2
    assert torch.equal(changed_s, changed_t) and changed_s[mixed].all()


@pytest.mark.parametrize(("augment", "blended", "lo", "hi"), [
    (ViewAugment(STILL.base, cutmix=1.0), True, 0.2, 0.8),
    (ViewAugment(STILL.base, occlude=1.0), False, 0.05, 0.5),
], ids=["cutmix", "occlude"])
def test_rectangles_cover_the_same_facial_points_in_both_views(setup, augment, blended, lo, hi):
    """A CutMix rectangle (another face) or an occluder (one colour) is drawn once, in the aligned crop: each of the
    5 landmarks (eyes, nose, mouth corners) is covered in both views or in neither, so the teacher describes the
    very picture the student sees. A blend is kept out of the triplet term; an occluded face keeps its identity."""
    _, views, _, _ = setup
    idx = np.arange(12)
    plain_x, plain_chips, _ = views.draw(idx, 112, STILL, torch.Generator().manual_seed(3))
    agree = covered = 0
    for seed in range(4):
        x, chips, mixed = views.draw(idx, 112, augment, torch.Generator().manual_seed(seed))
        assert bool(mixed.all()) is blended and bool(mixed.any()) is blended
        for i in idx:
            crop_pts = ARCFACE_TEMPLATE  # STILL: the student's 112 px view is the aligned crop itself
            crop_to_chip = np.linalg.inv(chip_to_crop(views.student[i], views.teacher[i]))
            chip_pts = (crop_to_chip @ np.c_[crop_pts, np.ones(5)].T).T[:, :2]
            for (sx, sy), (tx, ty) in zip(np.rint(crop_pts).astype(int), np.rint(chip_pts).astype(int), strict=True):
                s_changed = float((x[i, :, sy, sx] - plain_x[i, :, sy, sx]).abs().max()) > 0.05
                t_changed = float((chips[i, :, ty, tx] - plain_chips[i, :, ty, tx]).abs().max()) > 6.0
                agree += s_changed == t_changed
                covered += s_changed
    assert lo * 240 < covered < hi * 240  # rectangles cover part of the face, not all or nothing
    assert agree >= 0.95 * 240


def test_the_students_view_warped_into_the_chip_frame_still_shows_the_teacher_the_same_face(setup):
    """bench/distill_gap.py's input ceiling: the teacher on only the student's pixels (its crop, at 112 or 96 px)
    still describes each photo as the reference does, and a wrong frame would not (dlib's Euclidean distance;
    its same-person threshold is 0.6)."""
    _, views, ref, _ = setup
    idx = np.arange(12)
    for res in (112, 96):
        x, _, _ = views.draw(idx, res, STILL, torch.Generator().manual_seed(0))
        chips = student_view_as_chip(x, views.student, views.teacher)
        assert chips.shape == (12, 3, CHIP_SIZE, CHIP_SIZE)
        assert np.linalg.norm(teacher_of(chips) - ref, axis=1).max() < 0.13
    wrong = student_view_as_chip(x, views.student, views.teacher[::-1].copy())
    assert np.linalg.norm(teacher_of(wrong) - ref, axis=1).mean() > 0.2


@pytest.mark.parametrize("augment", [ViewAugment(), ViewAugment(mixup=0.5, cutmix=0.5, occlude=0.5, degrade=0.5)],
                         ids=["plain", "blends"])
def test_views_drawn_from_photos_on_a_device_are_the_same_views(setup, augment):
    """``ViewSource.to`` moves the photos (to a GPU in training); the batch must not change. The "meta" device
    stands in for a GPU here: it refuses, as CUDA does, any operation that mixes its tensors with CPU ones."""
    _, views, _, _ = setup
    idx = np.array([3, 0, 7, 7, 11, 5])
    x, chips, mixed = views.draw(idx, 112, augment, torch.Generator().manual_seed(4))
    moved = views.to(torch.device("cpu"))
    assert isinstance(moved.images, torch.Tensor)
    x2, chips2, mixed2 = moved.draw(idx, 112, augment, torch.Generator().manual_seed(4))
    assert torch.equal(x, x2) and torch.equal(chips, chips2) and torch.equal(mixed, mixed2)
    xm, chips_m, mixed_m = views.to(torch.device("meta")).draw(idx, 112, augment, torch.Generator().manual_seed(4))
    assert xm.device.type == chips_m.device.type == "meta" and xm.shape == x.shape and chips_m.shape == chips.shape
    assert mixed_m.device.type == "cpu" and torch.equal(mixed_m, mixed)  # the loop's label masks stay on the CPU


def test_crop_from_source_rebuilds_the_crop_prepare_wrote(setup):
    """bench/gpu/unpack.py rebuilds the prepared crops from the photos and the manifest's landmarks (two decimals)."""
    from PIL import Image

    from training.prepare import crop_from_source

    faces, views, _, _ = setup
    for i in range(len(faces)):
        rebuilt = crop_from_source(Image.fromarray(np.asarray(views.images[i])), faces.landmarks[i]).astype(float)
        assert np.abs(rebuilt - faces.crops[i]).mean() < 0.1  # a 0.5 px shift: > 3; no pad: up to 0.17


def detail(x: torch.Tensor) -> torch.Tensor:
    """Per-image energy of the horizontal and vertical pixel differences: what blurring removes."""
    return (x.diff(dim=-1) ** 2).mean(dim=(1, 2, 3)) + (x.diff(dim=-2) ** 2).mean(dim=(1, 2, 3))


def test_degrade_blurs_the_same_photos_in_both_views(setup):
    """``degrade`` resamples a sample's photo through a smaller size before both warps: the student's view and the
    teacher's chip lose detail together, and the samples it leaves alone are exactly the plain views."""
    _, views, ref, _ = setup
    idx = np.arange(12)
    plain_x, plain_chips, _ = views.draw(idx, 112, STILL, torch.Generator().manual_seed(5))
    half = ViewAugment(STILL.base, degrade=0.5, degrade_scale=(0.4, 0.4))
    x, chips, mixed = views.draw(idx, 112, half, torch.Generator().manual_seed(5))
    hit = (x - plain_x).abs().mean(dim=(1, 2, 3)) > 1e-4
    assert 0 < int(hit.sum()) < 12 and not mixed.any()  # the identity is kept: not a blend
    assert torch.equal(hit, (chips - plain_chips).abs().mean(dim=(1, 2, 3)) > 1e-3)
    for view, plain in ((x, plain_x), (chips, plain_chips)):
        ratio = detail(view[hit]) / detail(plain[hit])
        assert (ratio < 0.9).all() and ratio.mean() < 0.65
    assert torch.equal(x[~hit], plain_x[~hit]) and torch.equal(chips[~hit], plain_chips[~hit])
    # still the same person to the teacher
    assert cosine(teacher_of(chips[hit]), ref[hit.numpy()]).mean() > 0.85
