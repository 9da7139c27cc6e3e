"""MobileNet v1 exactly as the paper builds it (Howard et al. 2017, Table 1), plus a backbone registry.

The layer list is data (``MOBILENET_V1_LAYERS``) so the network and the cost model (``model.cost``) are built
from the same table. Torchvision's MobileNetV2 and V3-Small register beside it, so training and serving pick
a backbone by name and share one embedding head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.errors import InvalidConfig

# (kind, stride, output channels at alpha = 1): Table 1 of the paper. "conv" is the standard 3x3 convolution,
# "dws" a depthwise separable block (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU).
MOBILENET_V1_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv", 2, 32),
    ("dws", 1, 64),
    ("dws", 2, 128),
    ("dws", 1, 128),
    ("dws", 2, 256),
    ("dws", 1, 256),
    ("dws", 2, 512),
    *(("dws", 1, 512),) * 5,
    ("dws", 2, 1024),
    ("dws", 1, 1024),
)
MIN_RESOLUTION = 32  # five stride-2 stages: anything smaller leaves no spatial extent to pool
MAX_RESOLUTION = 1024


def scaled_channels(channels: int, alpha: float) -> int:
    """The width multiplier: every layer's channels times alpha (paper, section 3.3)."""
    return max(1, int(round(channels * alpha)))


def conv_out_size(size: int, stride: int, kernel: int = 3) -> int:
    """Spatial size after a ``kernel`` conv with 'same'-style padding ``kernel // 2``."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


def check_knobs(alpha: float, resolution: int) -> None:
    """Raise ``InvalidConfig`` for a width multiplier or input size the network cannot take."""
    if not (isinstance(alpha, int | float) and 0.0 < float(alpha) <= 1.0):
        raise InvalidConfig(f"alpha must be in (0, 1], got {alpha!r}")
    if not (isinstance(resolution, int) and MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
        raise InvalidConfig(
            f"input size must be an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels, got {resolution!r}"
        )


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (carries the stride) + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = ConvBNReLU(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pointwise = ConvBNReLU(in_ch, out_ch, 1)


class MobileNetV1(nn.Module):
    """The MobileNet v1 body: returns globally average-pooled features of size ``out_channels``.

    ``standard_conv=True`` builds the paper's full-convolution baseline (each block one 3x3 conv), the
    comparison behind its 8-9x saving.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        resolution: int = 224,
        layers: tuple[tuple[str, int, int], ...] = MOBILENET_V1_LAYERS,
        standard_conv: bool = False,
    ) -> None:
        super().__init__()
        check_knobs(alpha, resolution)
        self.alpha, self.resolution = float(alpha), resolution
        blocks: list[nn.Module] = []
        in_ch = 3
        for kind, stride, channels in layers:
            out_ch = scaled_channels(channels, alpha)
            if kind == "conv" or standard_conv:
                blocks.append(ConvBNReLU(in_ch, out_ch, 3, stride))
            else:
                blocks.append(DepthwiseSeparable(in_ch, out_ch, stride))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = in_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class TorchvisionBody(nn.Module):
    """A torchvision MobileNet's ``features`` + global pool, so it plugs into the same embedding head."""

    def __init__(self, features: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.features, self.pool, self.out_channels = features, nn.AdaptiveAvgPool2d(1), out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _mobilenet_v2(alpha: float, resolution: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    check_knobs(alpha, resolution)
    net = mobilenet_v2(weights=None, width_mult=alpha)
    return TorchvisionBody(net.features, net.last_channel)


def _mobilenet_v3_small(alpha: float, resolution: int) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    check_knobs(alpha, resolution)
    net = mobilenet_v3_small(weights=None, width_mult=alpha)
    return TorchvisionBody(net.features, net.features[-1].out_channels)


BackboneBuilder = Callable[[float, int], nn.Module]
BACKBONES: dict[str, BackboneBuilder] = {
    "mobilenet_v1": lambda alpha, resolution: MobileNetV1(alpha, resolution),
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _mobilenet_v3_small,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a face embedding network; stored inside every weights bundle."""

    backbone: str = "mobilenet_v1"
    alpha: float = 0.5
    resolution: int = 112
    embedding_dim: int = 128

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise InvalidConfig(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        check_knobs(self.alpha, self.resolution)
        if not (isinstance(self.embedding_dim, int) and 8 <= self.embedding_dim <= 4096):
            raise InvalidConfig(f"embedding_dim must be an integer from 8 to 4096, got {self.embedding_dim!r}")


class FaceEmbeddingNet(nn.Module):
    """Backbone -> linear -> BN -> L2 normalisation: unit vectors, so cosine similarity is a dot product."""

    def __init__(self, body: nn.Module, embedding_dim: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Sequential(
            nn.Linear(body.out_channels, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.body(x)), dim=1)


def build_model(config: ModelConfig) -> FaceEmbeddingNet:
    """The one way to turn a ``ModelConfig`` into a network."""
    config.validate()
    return FaceEmbeddingNet(BACKBONES[config.backbone](config.alpha, config.resolution), config.embedding_dim)


def mobilenet_v1_face(alpha: float = 0.5, resolution: int = 112, embedding_dim: int = 128) -> FaceEmbeddingNet:
    """The default family: MobileNet v1 with an embedding head."""
    return build_model(ModelConfig("mobilenet_v1", alpha, resolution, embedding_dim))
