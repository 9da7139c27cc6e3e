"""Per-layer mult-adds and parameters of MobileNet v1, computed from the layer table, not a traced module.

With the paper's ImageNet head this reproduces its Tables 4-7 (569M mult-adds and 4.2M parameters at alpha 1.0,
224 px); the tests cross-check the parameter count against the built torch module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from model.mobilenet import MOBILENET_V1_LAYERS, check_knobs, conv_out_size, scaled_channels

HEADS = ("imagenet", "embedding", "none")


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # conv / dw / pw / fc
    input_size: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    output_size: int
    mult_adds: int
    params: int  # weights (and the FC bias), as the paper counts; BN parameters are in ``bn_params``
    bn_params: int


@dataclass(frozen=True)
class CostReport:
    alpha: float
    resolution: int
    head: str
    standard_conv: bool
    layers: tuple[LayerCost, ...]

    @property
    def mult_adds(self) -> int:
        return sum(layer.mult_adds for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bn_params(self) -> int:
        return sum(layer.bn_params for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "resolution": self.resolution,
            "head": self.head,
            "standard_conv": self.standard_conv,
            "mult_adds": self.mult_adds,
            "params": self.params,
            "bn_params": self.bn_params,
            "layers": [asdict(layer) for layer in self.layers],
        }


def _conv(name, kind, size, cin, cout, k, s, groups=1) -> LayerCost:
    out = conv_out_size(size, s, k)
    weights = k * k * (cin // groups) * cout
    return LayerCost(name, kind, size, cin, cout, k, s, out, weights * out * out, weights, 2 * cout)


def mobilenet_v1_cost(
    alpha: float = 1.0,
    resolution: int = 224,
    head: str = "imagenet",
    standard_conv: bool = False,
    num_classes: int = 1000,
    embedding_dim: int = 128,
) -> CostReport:
    """Cost of every layer; ``standard_conv`` prices the paper's full-convolution baseline instead."""
    check_knobs(alpha, resolution)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    layers: list[LayerCost] = []
    size, cin = resolution, 3
    for i, (kind, stride, channels) in enumerate(MOBILENET_V1_LAYERS):
        cout = scaled_channels(channels, alpha)
        if kind == "conv" or standard_conv:
            layers.append(_conv(f"conv{i}", "conv", size, cin, cout, 3, stride))
        else:
            layers.append(_conv(f"conv{i}_dw", "dw", size, cin, cin, 3, stride, groups=cin))
            size = layers[-1].output_size
            layers.append(_conv(f"conv{i}_pw", "pw", size, cin, cout, 1, 1))
        size, cin = layers[-1].output_size, cout
    if head == "imagenet":
        weights = cin * num_classes
        layers.append(LayerCost("fc", "fc", 1, cin, num_classes, 1, 1, 1, weights, weights + num_classes, 0))
    elif head == "embedding":
        # linear without bias, then BatchNorm1d (its affine parameters counted as BN)
        weights = cin * embedding_dim
        layers.append(LayerCost("embedding", "fc", 1, cin, embedding_dim, 1, 1, 1, weights, weights, 2 * embedding_dim))
    return CostReport(float(alpha), resolution, head, standard_conv, tuple(layers))
