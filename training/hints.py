"""Feature hints (FitNets, Romero et al. 2015): the student's mid-level map regresses the teacher's, cell by cell.

Why: distillation so far taught the student 128 numbers per view, the teacher's descriptor, and the student fits
training faces much better than held-out ones (``bench/distill_gap.py``): a small data set that it learns too few
bits from. The teacher's mid-level map says how it sees every region of the face, thousands of numbers per view.

The two networks look at the same augmented photo in different framings (the student's aligned crop, the
teacher's dlib chip; ``training.views``), so the teacher's map is resampled at the places the student's cells
look at: each student cell's receptive-field centre, mapped from the student's input through the aligned crop
into the chip (``chip_to_crop``), then into the teacher's map. Both sides are compared by angle per cell; a small
1x1 conv + BN (``HintHead``) turns the student's channels into the teacher's, and is dropped after training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.views import chip_to_crop, crop_to_view

# The pair of layers: the teacher's last 128-filter block (8x8 on its 150 px chip) and MobileNet v1's last
# 512-channel block (7x7 at 112 px): the last maps before each network's final stride-2 stage.
TEACHER_BLOCK = 9  # index into DlibResNet.blocks
TEACHER_CHANNELS = 128
STUDENT_LAYER = 11  # index into MobileNetV1.features
# Receptive-field centres: cell i of the student's map looks at input pixel 16 i (four padded 3x3/2 convs).
# The teacher's main path puts cell m at chip pixel 17 + 16 m (7x7/2 conv, 3x3/2 max pool, two unpadded 3x3/2
# convs), its 2x2 average-pool shortcuts at 11 + 16 m; with every weight equal, the paths peak at 12 + 16 m
# (tests/test_training_hints.py measures both networks that way).
TEACHER_OFFSET, TEACHER_STRIDE = 12.0, 16.0
STUDENT_OFFSET, STUDENT_STRIDE = 0.0, 16.0


@contextmanager
def tapped(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every output of ``module`` is appended to the yielded list (a forward hook)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def teacher_grid(student: np.ndarray, teacher: np.ndarray, resolution: int, cells: int,
                 teacher_cells: int) -> torch.Tensor:
    """(n, cells, cells, 2) where each student cell looks, in the teacher's map, as ``grid_sample`` coordinates
    (align_corners=True: -1 and 1 are the first and last cells' centres; beyond them is off the map).

    ``student`` and ``teacher`` are the views' source -> crop and source -> chip matrices (``ViewSource``); the
    augmentation both views share cancels out."""
    centres = STUDENT_OFFSET + STUDENT_STRIDE * np.arange(cells)
    xs, ys = np.meshgrid(centres, centres)  # input pixels, (cells, cells), x along columns
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(cells * cells)])  # (3, cells^2)
    view_to_chip = np.linalg.inv(chip_to_crop(student, teacher)) @ np.linalg.inv(crop_to_view(resolution))
    chip = view_to_chip @ pts  # (n, 3, cells^2)
    cell = (chip[:, :2] - TEACHER_OFFSET) / TEACHER_STRIDE
    norm = 2 * cell / (teacher_cells - 1) - 1
    return torch.as_tensor(norm.transpose(0, 2, 1).reshape(-1, cells, cells, 2), dtype=torch.float32)


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Mean over the student's cells that fall on the teacher's map of ``2 - 2 cos`` between the student's
    (projected) feature vector and the teacher's, bilinearly sampled at ``grid``.

    Matched by angle, as the descriptors are: the two networks' activations have unrelated scales. The teacher's
    map is centred first (each channel's mean over the batch's cells): its activations come out of a ReLU, and
    non-negative vectors all point roughly the same way (cos ~0.85 between a fresh regressor's output and them)."""
    grid = grid.to(teacher_map.device)
    teacher_map = teacher_map.float()
    centred = teacher_map - teacher_map.mean(dim=(0, 2, 3), keepdim=True)
    sampled = F.grid_sample(centred, grid, mode="bilinear", align_corners=True)
    inside = (grid.abs() <= 1).all(-1)  # (n, h, w)
    s, t = F.normalize(student_map.float(), dim=1), F.normalize(sampled, dim=1)
    per_cell = (s - t).pow(2).sum(1)
    if not bool(inside.any()):
        return per_cell.sum() * 0.0
    return per_cell[inside].mean()


class HintHead(nn.Module):
    """Student channels -> teacher channels (1x1 conv + BN): a regressor that exists only while training."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                  nn.BatchNorm2d(teacher_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
