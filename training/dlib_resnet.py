"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) as a PyTorch module.

Why: dlib itself costs ~100 ms a face here, so its descriptors could only be cached once per image, and the
student was taught on augmented views against the *un-augmented* image's target. In PyTorch the same network
runs batched at ~6 ms a face on 2 cores, fast enough to compute the teacher's answer for the very view the
student sees ("consistent teaching", Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent").

The architecture is dlib's ``dnn_face_recognition_ex.cpp`` network: a 7x7/2 conv, 3x3/2 max pool, 14 residual
blocks (32, 64, 128, 256, 256 filters; ``affine`` layers are frozen batch norms), global average pool and a
128-d linear layer without bias. Where dlib adds tensors of different shapes (strided convs without padding
next to 2x2 average pools) it zero-pads to the larger one; ``_add_padded`` does the same. The weights are read
straight from dlib's file (``read_dlib_net``); ``tests/test_training_dlib_resnet.py`` checks the descriptors
against dlib's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHIP_SIZE = 150
# input_rgb_image_sized<150>'s defaults: pixel -> (pixel - mean) / 256
RGB_MEAN = (122.782, 117.001, 104.298)
# (filters, blocks, first block downsamples) from input to output; 29 conv + affine pairs in all
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class _Affine(nn.Module):
    """dlib's ``affine`` layer: a per-channel scale and shift (batch norm folded at the end of training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("gamma", torch.ones(channels))
        self.register_buffer("beta", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger shape, the smaller tensor zero-padded (channels, rows, cols)."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.aff1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = _Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        if self.down:
            return F.relu(_add_padded(F.avg_pool2d(x, 2, 2), y))
        return F.relu(x + y)


class DlibResNet(nn.Module):
    """150x150 RGB chips (uint8 range, NCHW float) -> dlib's 128-d descriptors (not normalised, as dlib's)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_aff = _Affine(32)
        blocks, cin = [], 32
        for cout, count, down in LEVELS:
            for i in range(count):
                blocks.append(_Block(cin, cout, down and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem_aff(self.stem(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def _read_int(buf: bytes, i: int) -> tuple[int, int]:
    """dlib's integer encoding: a control byte (low 4 bits = byte count, bit 7 = sign), then little endian."""
    ctrl = buf[i]
    n = ctrl & 0x0F
    value = int.from_bytes(buf[i + 1 : i + 1 + n], "little")
    return (-value if ctrl & 0x80 else value), i + 1 + n


def _read_tensor(buf: bytes, i: int) -> tuple[np.ndarray, int]:
    """A dlib tensor (version 2): four dimensions, then raw little-endian float32."""
    version, i = _read_int(buf, i)
    if version != 2:
        raise ValueError(f"unsupported dlib tensor version {version}")
    shape = []
    for _ in range(4):
        v, i = _read_int(buf, i)
        shape.append(v)
    n = int(np.prod(shape))
    return np.frombuffer(buf, "<f4", n, i).copy(), i + 4 * n


_LAYER = re.compile(rb"\x05con_4|\x07affine_|\x04fc_2")


def read_dlib_net(path: str | Path) -> list[tuple[str, np.ndarray, list[int]]]:
    """(kind, parameters, header ints) of every con/affine/fc layer in file order (input to output).

    dlib serialises a network from its input layer outwards, each layer as a name tag and its parameter
    tensor; the other bookkeeping between them (relu, pools, tags) carries no weights and is skipped.
    """
    buf = Path(path).read_bytes()
    layers = []
    for m in _LAYER.finditer(buf):
        kind, i, header = m.group()[1:].decode(), m.end(), []
        if kind == "fc_2":  # num_outputs, num_inputs come before its parameters
            for _ in range(2):
                v, i = _read_int(buf, i)
                header.append(v)
        params, i = _read_tensor(buf, i)
        if kind == "con_4":  # num_filters, rows, cols, stride y/x, padding y/x follow the parameters
            for _ in range(7):
                v, i = _read_int(buf, i)
                header.append(v)
        layers.append((kind, params, header))
    return layers


def load_dlib_resnet(path: str | Path) -> DlibResNet:
    """A ``DlibResNet`` in eval mode with the weights of dlib's model file; checks every shape on the way."""
    net = DlibResNet()
    convs = [net.stem] + [c for b in net.blocks for c in (b.conv1, b.conv2)]
    affines = [net.stem_aff] + [a for b in net.blocks for a in (b.aff1, b.aff2)]
    layers = read_dlib_net(path)
    con = [(p, h) for k, p, h in layers if k == "con_4"]
    aff = [p for k, p, _ in layers if k == "affine_"]
    fc = [(p, h) for k, p, h in layers if k == "fc_2"]
    if len(con) != len(convs) or len(aff) != len(affines) or len(fc) != 1:
        raise ValueError(f"{path}: not dlib's face recognition ResNet ({len(con)} convs, {len(aff)} affines)")
    with torch.no_grad():
        for conv, (params, (filters, rows, cols, stride, _, pad, _)) in zip(convs, con, strict=True):
            w = conv.weight
            expected = (w.shape[0], w.shape[2], w.shape[3], conv.stride[0], conv.padding[0])
            if (filters, rows, cols, stride, pad) != expected:
                raise ValueError(f"{path}: unexpected conv layer {filters}x{rows}x{cols}/{stride} pad {pad}")
            n = w.numel()
            w.copy_(torch.from_numpy(params[:n]).view_as(w))
            conv.bias.copy_(torch.from_numpy(params[n:]))
        for layer, params in zip(affines, aff, strict=True):
            gamma, beta = np.split(params, 2)
            layer.gamma.copy_(torch.from_numpy(gamma))
            layer.beta.copy_(torch.from_numpy(beta))
        params, (outputs, inputs) = fc[0]
        net.fc.weight.copy_(torch.from_numpy(params.reshape(inputs, outputs).T))
    return net.eval()
