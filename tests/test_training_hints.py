"""training.hints: where each network's cells look (measured on both architectures), the grid that pairs them
(hand-made framings whose answer is known), and the per-cell loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model.align import ARCFACE_TEMPLATE
from model.mobilenet import MobileNetV1
from model.preprocess import MEAN, STD
from training.data import Augment
from training.dlib_resnet import CHIP_SIZE, DlibResNet
from training.hints import (
    STUDENT_LAYER,
    STUDENT_OFFSET,
    STUDENT_STRIDE,
    TEACHER_BLOCK,
    TEACHER_CHANNELS,
    TEACHER_OFFSET,
    TEACHER_STRIDE,
    HintHead,
    hint_loss,
    tapped,
    teacher_grid,
)
from training.views import ViewAugment, chip_matrix, draw_views, student_matrix, translation


def uniform(net: nn.Module) -> nn.Module:
    """Every conv an average of its inputs, no biases: on a constant positive image every ReLU passes, so the
    network is linear and an output cell's gradient counts the paths to each input pixel, peaking at its
    receptive field's centre."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return net.eval()


def peak(net: nn.Module, layer: nn.Module, size: int, cell: int) -> tuple[int, int]:
    x = torch.full((1, 3, size, size), 200.0, requires_grad=True)
    with tapped(layer) as out:
        net(x)
    out[0][0, :, cell, cell].sum().backward()
    row, col = divmod(int(x.grad[0].sum(0).argmax()), size)
    return row, col


@pytest.mark.parametrize("cell", [2, 3, 4, 5])
def test_the_teachers_cells_look_where_the_constants_say(cell):
    net = uniform(DlibResNet())
    centre = TEACHER_OFFSET + TEACHER_STRIDE * cell
    assert peak(net, net.blocks[TEACHER_BLOCK], CHIP_SIZE, cell) == (centre, centre)


@pytest.mark.parametrize("cell", [2, 3, 4])
def test_the_students_cells_look_where_the_constants_say(cell):
    net = uniform(MobileNetV1(0.5, 112))
    centre = STUDENT_OFFSET + STUDENT_STRIDE * cell
    row, col = peak(net, net.features[STUDENT_LAYER], 112, cell)
    assert abs(row - centre) <= 1 and abs(col - centre) <= 1  # a 3x3/2 padded conv's peak is a 2-pixel plateau


def test_the_tapped_maps_have_the_sizes_the_grid_assumes():
    teacher, student = DlibResNet().eval(), MobileNetV1(0.5, 112).eval()
    with tapped(teacher.blocks[TEACHER_BLOCK]) as t, tapped(student.features[STUDENT_LAYER]) as s:
        teacher(torch.zeros(1, 3, CHIP_SIZE, CHIP_SIZE))
        student(torch.zeros(1, 3, 112, 112))
    assert t[0].shape == (1, TEACHER_CHANNELS, 8, 8)
    assert s[0].shape == (1, 256, 7, 7)


def test_the_grid_puts_each_student_cell_on_the_teacher_cell_that_sees_the_same_pixels():
    """Source = aligned crop; the chip is the crop shifted by the teacher's offset, so student cell i (crop
    pixel 16 i) and teacher cell i (chip pixel 12 + 16 i) see the same source pixel."""
    student = np.eye(3)[None]
    teacher = translation(TEACHER_OFFSET - STUDENT_OFFSET, TEACHER_OFFSET - STUDENT_OFFSET)[None]
    grid = teacher_grid(student, teacher, 112, cells=7, teacher_cells=8)
    assert grid.shape == (1, 7, 7, 2)
    expected = torch.tensor([2 * i / 7 - 1 for i in range(7)])
    assert torch.allclose(grid[0, 3, :, 0], expected, atol=1e-6)  # x along a row
    assert torch.allclose(grid[0, :, 3, 1], expected, atol=1e-6)  # y down a column
    # at 224 px the student's cells are 16 input pixels = 8 crop pixels apart: half a teacher cell
    half = teacher_grid(student, teacher, 224, cells=14, teacher_cells=8)
    assert torch.allclose(half[0, 0, :, 0], torch.tensor([i / 7 - 1 for i in range(14)]), atol=1e-6)


@pytest.mark.parametrize("resolution", [96, 112, 128])
def test_each_student_cell_and_its_grid_point_see_the_same_source_pixel(resolution):
    """Through ``draw_views``' own augmentation (mirror, rotation, scale, shift) on a photo whose pixels hold their
    coordinates (x in red, y in green): under each student cell's centre, and at the chip point the grid pairs it
    with, the two views show the same source pixel."""
    size = 250
    ys, xs = np.mgrid[:size, :size]
    photo = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)[None].repeat(4, 0)
    student = np.stack([student_matrix(ARCFACE_TEMPLATE * s + o) for s, o in ((1.5, 40), (1.2, 60), (1.8, 20),
                                                                                  (1.4, 50))])
    teacher = np.stack([chip_matrix((55.0 + d, 50.0, 195.0 + d, 190.0), a) for d, a in ((0, 0.0), (5, 0.1),
                                                                                        (-8, -0.05), (3, 0.02))])
    augment = ViewAugment(Augment(flip=0.5, colour=0, grey=0, max_rotate_deg=10, max_scale=0.1, max_shift=0.08))
    s_view, t_view, _ = draw_views(photo, student, teacher, resolution, augment, torch.Generator().manual_seed(1))
    cells = -(-resolution // 16)
    grid = teacher_grid(student, teacher, resolution, cells, 8)
    chip_px = TEACHER_OFFSET + TEACHER_STRIDE * (grid + 1) * 7 / 2  # back from grid_sample's [-1, 1] to chip pixels
    at_chip = torch.nn.functional.grid_sample(t_view, (2 * chip_px + 1) / CHIP_SIZE - 1, align_corners=False)
    centres = (STUDENT_OFFSET + STUDENT_STRIDE * torch.arange(cells)).long()
    at_cell = (s_view * STD + MEAN)[:, :, centres][:, :, :, centres]
    inside = (at_chip[:, 2] == 0) & (at_cell[:, 2].abs() < 0.5) & (grid.abs() <= 1).all(-1)  # on the photo, both
    assert inside.float().mean() > 0.3
    error = (at_chip[:, :2] - at_cell[:, :2]).abs().amax(1)[inside]
    assert float(error.max()) < 0.05  # source pixels: the same point, to bilinear rounding


def test_hint_loss_is_zero_on_the_teachers_own_map_and_ignores_cells_off_it():
    torch.manual_seed(0)
    teacher_map = torch.rand(2, 4, 5, 5)
    cells = torch.linspace(-1, 1, 5)
    ys, xs = torch.meshgrid(cells, cells, indexing="ij")
    grid = torch.stack([xs, ys], -1).expand(2, 5, 5, 2).clone()
    centred = teacher_map - teacher_map.mean(dim=(0, 2, 3), keepdim=True)
    # matched by angle to the centred map: the scale of either side, and the teacher's offset, do not matter
    assert float(hint_loss(3.0 * centred, teacher_map + 5.0, grid)) == pytest.approx(0.0, abs=1e-5)
    assert float(hint_loss(teacher_map, teacher_map, grid)) > 0.5  # the raw (all-positive) map is not the target
    other = torch.rand(2, 4, 5, 5)
    off = grid.clone()
    off[:, 0] = 3.0  # the first row of student cells falls off the teacher's map: whatever they hold is ignored
    noisy = other.clone()
    noisy[:, :, 0] = torch.rand(2, 4, 5) * 100
    expected = (2 - 2 * torch.nn.functional.cosine_similarity(other, centred, dim=1))[:, 1:].mean()
    assert float(hint_loss(noisy, teacher_map, off)) == pytest.approx(float(expected), rel=1e-5)
    assert float(hint_loss(other, teacher_map, torch.full_like(grid, 5.0))) == 0.0  # nothing on the map


def test_the_hint_head_maps_student_channels_to_the_teachers():
    assert HintHead(256, TEACHER_CHANNELS)(torch.rand(2, 256, 7, 7)).shape == (2, TEACHER_CHANNELS, 7, 7)
