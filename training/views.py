"""Consistent teaching: the student and the teacher look at the *same* augmented face.

The cached-teacher recipe augments the student's crop but keeps the target of the un-augmented image, so every
rotated, shifted or recoloured view is taught a slightly wrong answer, and the student can only learn ~2 targets
per image (plain and mirrored). Here both views are drawn from the source photo in one step:

- the student's view: the photo warped onto the 112x112 ArcFace template by the MTCNN landmarks that
  ``visage prepare`` recorded (the serving alignment), then through a random similarity G (mirror, rotation,
  scale, shift);
- the teacher's view: the same augmented photo, framed as dlib frames its 150x150 chip (dlib's 5-point shape
  model on the face box the teacher used), so the teacher answers for exactly what the student sees;
- colour jitter is applied to the photo before either warp; optional mixup blends two aligned views of each
  kind with the same weight, and the teacher describes the blend ("function matching");
- optional CutMix pastes a rectangle of another sample's face into a sample. Faces here are aligned, so the
  rectangle covers the same facial region (eyes, nose, mouth...) of both: the result is a new, plausible face
  whose identity nobody labelled, and the teacher says who it looks like. The rectangle is drawn in the
  augmented 112 px crop and mapped into each view by that view's own transform.

All matrices map pixel coordinates with integer pixel centres (dlib's convention), source -> output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F

from model.align import CROP_SIZE, similarity_to_template
from model.preprocess import MEAN, STD, as_tensor
from training.data import Augment, colour_jitter
from training.dlib_resnet import CHIP_SIZE

GREY = 128.0


def student_matrix(landmarks: np.ndarray) -> np.ndarray:
    """Source pixels -> the 112x112 aligned crop's pixels (the same similarity ``align_face`` uses)."""
    return similarity_to_template(np.asarray(landmarks, dtype=np.float64).reshape(5, 2)).params


def chip_matrix(rect: tuple[float, float, float, float], angle: float, size: int = CHIP_SIZE) -> np.ndarray:
    """dlib's chip_details (rect left/top/right/bottom, angle) -> image pixels to chip pixels.

    dlib maps the rect's corners, rotated by ``angle`` about its centre, onto the chip's corners.
    """
    left, top, right, bottom = rect
    cx, cy, c, s = (left + right) / 2, (top + bottom) / 2, math.cos(angle), math.sin(angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        return cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)

    src = np.array([rot(left, top), rot(right, top), rot(right, bottom)])
    dst = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1]], dtype=np.float64)
    m = np.linalg.solve(np.c_[src, np.ones(3)], dst).T
    return np.vstack([m, [0.0, 0.0, 1.0]])


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class ViewAugment:
    """The random geometry and colour of a batch of views (``Augment``'s ranges), and optional blends (mixup,
    CutMix) and occluders, each drawn once in the aligned crop and seen alike by student and teacher."""

    base: Augment = Augment()
    mixup: float = 0.0  # fraction of samples blended with another sample of the batch
    mixup_alpha: float = 0.4  # Beta(a, a) for the blend weight
    cutmix: float = 0.0  # fraction of the samples mixup left alone that get a rectangle of another face
    cutmix_area: tuple[float, float] = (0.15, 0.5)  # the rectangle's share of the crop, drawn uniformly
    occlude: float = 0.0  # fraction of all samples with a rectangle of one random colour (identity kept)
    occlude_area: tuple[float, float] = (0.05, 0.3)
    degrade: float = 0.0  # fraction of all samples whose photo is downscaled and upscaled back before both warps
    degrade_scale: tuple[float, float] = (0.35, 1.0)  # the downscale factor, drawn uniformly

    def degraded(self, src: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``src`` (n, 3, H, W) with a share ``degrade`` of its photos resampled through a smaller size: a blurred,
        low-resolution photo, as many of LFW's are. Before the warps, so the teacher sees the same loss of detail."""
        if self.degrade <= 0:  # (no draw otherwise: runs without it keep their random stream)
            return src
        n, size = src.shape[0], src.shape[-2:]
        lo, hi = self.degrade_scale
        chosen = (torch.rand(n, generator=gen) < self.degrade).nonzero()[:, 0].tolist()
        factors = (lo + torch.rand(n, generator=gen) * (hi - lo)).tolist()
        out = src.clone()
        for i in chosen:
            small = F.interpolate(src[i:i + 1], scale_factor=factors[i], mode="bilinear", antialias=True)
            out[i:i + 1] = F.interpolate(small, size=size, mode="bilinear")
        return out

    def rectangles(self, n: int, gen: torch.Generator, area: tuple[float, float] | None = None) -> np.ndarray:
        """(n, 112, 112) masks, 1 inside a random rectangle of the augmented crop (aspect 1:2 to 2:1, clipped),
        covering a share of the crop drawn uniformly from ``area`` (default ``cutmix_area``)."""
        u = torch.rand(n, 4, generator=gen, dtype=torch.float64).numpy()
        lo, hi = area or self.cutmix_area
        pixels = (lo + u[:, 0] * (hi - lo)) * CROP_SIZE**2
        aspect = np.exp((u[:, 1] * 2 - 1) * math.log(2.0))
        w, h = np.sqrt(pixels * aspect), np.sqrt(pixels / aspect)
        cx, cy = u[:, 2] * (CROP_SIZE - 1), u[:, 3] * (CROP_SIZE - 1)
        px = np.arange(CROP_SIZE)  # integer pixel centres, as everywhere here
        inside_x = np.abs(px[None, :] - cx[:, None]) <= w[:, None] / 2
        inside_y = np.abs(px[None, :] - cy[:, None]) <= h[:, None] / 2
        return (inside_y[:, :, None] & inside_x[:, None, :]).astype(np.float32)

    def geometry(self, n: int, gen: torch.Generator) -> np.ndarray:
        """(n, 3, 3) maps from augmented-crop pixels to aligned-crop pixels (applied as output -> source)."""
        a = self.base
        u = (torch.rand(n, 5, generator=gen, dtype=torch.float64) * 2 - 1).numpy()
        flip = (torch.rand(n, generator=gen) < a.flip).numpy()
        c = (CROP_SIZE - 1) / 2
        out = np.empty((n, 3, 3))
        for i in range(n):
            ang, scale = u[i, 0] * math.radians(a.max_rotate_deg), 1.0 + u[i, 1] * a.max_scale
            ca, sa = math.cos(ang) / scale, math.sin(ang) / scale
            rot = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
            mirror = np.diag([-1.0 if flip[i] else 1.0, 1.0, 1.0])
            shift = translation(*(u[i, 2:4] * a.max_shift * CROP_SIZE))
            out[i] = translation(c, c) @ shift @ rot @ mirror @ translation(-c, -c)
        return out


def _warp(src: torch.Tensor, out_to_src: np.ndarray, size: int) -> torch.Tensor:
    """Sample (n, 3, H, W) ``src`` (grey-centred) at ``out_to_src`` of each output pixel; outside is grey."""
    h, w = src.shape[2:]
    # normalised output coords -> output pixels -> source pixels -> normalised source coords (align_corners=False)
    to_pix = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
    to_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    theta = torch.as_tensor(to_norm @ out_to_src @ to_pix, dtype=torch.float32, device=src.device)[:, :2]
    grid = F.affine_grid(theta, [src.shape[0], src.shape[1], size, size], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_to_view(resolution: int) -> np.ndarray:
    """Aligned-crop pixels (112 px) -> the student's input pixels at ``resolution``."""
    return np.diag([resolution / CROP_SIZE, resolution / CROP_SIZE, 1.0])


def chip_to_crop(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """(n, 3, 3) teacher-chip pixels -> aligned-crop pixels of the same photo (through its source pixels)."""
    return student @ np.linalg.inv(teacher)


def _paste(view: torch.Tensor, partner: torch.Tensor, masks: torch.Tensor, view_to_crop: np.ndarray) -> torch.Tensor:
    """``view`` with ``partner`` inside each crop-frame mask, the masks sampled through ``view_to_crop``."""
    m = _warp(masks[:, None], view_to_crop, view.shape[-1])
    return view * (1 - m) + partner * m


def draw_views(
    images: np.ndarray | torch.Tensor, student: np.ndarray, teacher: np.ndarray, resolution: int,
    augment: ViewAugment, gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source photos (n, H, W, 3) uint8 with their two alignments -> (student input normalised as in serving,
    teacher chips in 0..255, bool mask of mixed samples, on the CPU).

    The views are computed where ``images`` lives (a tensor on a GPU: ``ViewSource.to``). The random draws
    always come from ``gen`` on the CPU, so a batch has the same draws on either device (its values agree up to
    floating-point rounding)."""
    n = len(images)
    src = as_tensor(images).permute(0, 3, 1, 2).float()
    dev = src.device
    src = colour_jitter(src, augment.base.colour, augment.base.grey, gen, unit=STD).clamp_(0, 255) - GREY
    src = augment.degraded(src, gen)
    g = augment.geometry(n, gen)
    view_to_crop = np.linalg.inv(crop_to_view(resolution))
    chip_crop = chip_to_crop(student, teacher)
    s_inv = np.linalg.inv(student)
    # student: output px -> (scale back to 112) -> G -> aligned crop px -> source px
    s_view = _warp(src, s_inv @ g @ view_to_crop, resolution) + GREY
    # teacher: chip px -> source px of the un-augmented photo -> aligned crop px -> G -> source px
    t_view = _warp(src, s_inv @ g @ chip_crop, CHIP_SIZE) + GREY
    mixed = torch.rand(n, generator=gen) < augment.mixup
    if mixed.any():
        partner = torch.randperm(n, generator=gen)
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        lam = torch.as_tensor(np.random.default_rng(seed).beta(augment.mixup_alpha, augment.mixup_alpha, n),
                              dtype=torch.float32)
        lam = torch.where(mixed, torch.maximum(lam, 1 - lam), torch.ones(n))[:, None, None, None]
        lam, partner = lam.to(dev), partner.to(dev)
        s_view = lam * s_view + (1 - lam) * s_view[partner]
        t_view = lam * t_view + (1 - lam) * t_view[partner]

    def cover(i: torch.Tensor, s_fill: torch.Tensor, t_fill: torch.Tensor, masks: torch.Tensor) -> None:
        """Samples ``i`` (CPU indices) of both views, with the fills inside each crop-frame mask (in place)."""
        at, masks = i.to(dev), masks.to(dev)
        s_view[at] = _paste(s_view[at], s_fill, masks, np.broadcast_to(view_to_crop, (len(i), 3, 3)))
        t_view[at] = _paste(t_view[at], t_fill, masks, chip_crop[i.numpy()])

    cut = (torch.rand(n, generator=gen) < augment.cutmix) & ~mixed
    if cut.any():
        i = cut.nonzero()[:, 0]
        other = (i + torch.randint(1, n, (len(i),), generator=gen)) % n  # never the sample itself
        other = other.to(dev)
        cover(i, s_view[other], t_view[other], torch.as_tensor(augment.rectangles(len(i), gen)))
        mixed = mixed | cut
    if augment.occlude > 0:  # (no draw otherwise: runs without occluders keep their random stream)
        i = (torch.rand(n, generator=gen) < augment.occlude).nonzero()[:, 0]
        if len(i):  # a cap, a hand, a microphone: the teacher says how much of the face is still there
            masks = torch.as_tensor(augment.rectangles(len(i), gen, augment.occlude_area))
            fill = (torch.rand(len(i), 3, 1, 1, generator=gen) * 255 - GREY).to(dev)
            cover(i, fill, fill, masks)
    return ((s_view - MEAN) / STD).contiguous(), t_view.contiguous(), mixed


def student_view_as_chip(x: torch.Tensor, student: np.ndarray, teacher: np.ndarray) -> torch.Tensor:
    """The student's input (normalised, any resolution) warped into the teacher's chip frame, grey outside:
    what the teacher sees when it only gets the student's framing and pixels (bench/distill_gap.py)."""
    chip_to_view = crop_to_view(x.shape[-1]) @ chip_to_crop(student, teacher)
    return _warp(x * STD + MEAN - GREY, chip_to_view, CHIP_SIZE) + GREY


@dataclass
class ViewSource:
    """The training photos with both alignments, ready to draw consistent batches from."""

    images: np.ndarray | torch.Tensor  # (N, H, W, 3) uint8 source photos
    student: np.ndarray  # (N, 3, 3) source px -> aligned crop px
    teacher: np.ndarray  # (N, 3, 3) source px -> teacher chip px

    def to(self, device: torch.device) -> ViewSource:
        """The photos moved to ``device`` (~1 GB for LFW + CelebA), so that views are warped there: on a GPU the
        CPU would otherwise spend longer drawing a batch than the GPU spends training on it."""
        # (the photos are usually a read-only memmap of the decoded-photo cache)
        return replace(self, images=as_tensor(self.images).to(device))

    def draw(self, idx: np.ndarray, resolution: int, augment: ViewAugment, gen: torch.Generator):
        if isinstance(self.images, torch.Tensor):
            images = self.images[torch.as_tensor(idx, device=self.images.device)]
        else:
            images = self.images[idx]
        return draw_views(images, self.student[idx], self.teacher[idx], resolution, augment, gen)
