"""training.dlib_resnet: dlib's face descriptor network read from dlib's own file, in PyTorch, gives dlib's
numbers (to float rounding) on real face chips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.dlib_resnet import CHIP_SIZE, load_dlib_resnet, read_dlib_net
from training.paths import shared_data
from training.teacher import RESNET_FILE, DlibTeacher, models_dir

DAT = models_dir() / RESNET_FILE
IMAGES = ["lfw/images/Colin_Powell/Colin_Powell_0001.jpg", "lfw/images/Serena_Williams/Serena_Williams_0002.jpg",
          "celeba/images/7201/001085.jpg"]


@pytest.fixture(scope="module")
def teacher() -> DlibTeacher:
    return DlibTeacher()


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return load_dlib_resnet(DAT)


def test_the_file_holds_dlibs_29_conv_layers_and_a_128_d_projection():
    layers = read_dlib_net(DAT)
    convs = [h for k, _, h in layers if k == "con_4"]
    assert len(convs) == 29 and sum(k == "affine_" for k, _, _ in layers) == 29
    assert convs[0] == [32, 7, 7, 2, 2, 0, 0]  # 7x7/2, unpadded
    assert sum(h[3] == 2 for h in convs) == 5  # the stem and four downsampling blocks
    (kind, params, header), = [x for x in layers if x[0] == "fc_2"]
    assert header == [128, 256] and params.size == 256 * 128


def test_other_dlib_files_are_refused():
    with pytest.raises(ValueError, match="not dlib's face recognition ResNet"):
        load_dlib_resnet(models_dir() / "shape_predictor_5_face_landmarks.dat")


@pytest.mark.parametrize("rel", IMAGES)
def test_descriptors_equal_dlibs_on_its_own_chips(teacher, net, rel):
    import dlib

    with Image.open(shared_data() / rel) as img:
        canvas = teacher.canvas(img)
    shape = teacher.shape(canvas, teacher.face_rect(canvas))
    chip = dlib.get_face_chip(canvas, shape, CHIP_SIZE, 0.25)
    expected = np.array(dlib.face_recognition_model_v1(str(DAT)).compute_face_descriptor(chip))
    with torch.no_grad():
        ours = net(torch.from_numpy(chip).permute(2, 0, 1)[None].float())[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_batched_and_channels_last_give_the_same_answer(net):
    x = torch.rand(3, 3, CHIP_SIZE, CHIP_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        one = torch.cat([net(x[i : i + 1]) for i in range(3)])
        fast = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, one, atol=1e-4, rtol=1e-4)
