"""model.cost: the MobileNet paper's numbers, and the cost model checked against the torch modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.cost import mobilenet_v1_cost
from model.errors import InvalidConfig
from model.mobilenet import MobileNetV1, ModelConfig, build_model


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Howard et al. 2017, Table 6 (width multiplier, 224 px, ImageNet head): mult-adds in millions, params in
# millions, both as printed in the paper (mult-adds to the unit, params to one decimal).
@pytest.mark.parametrize(
    ("alpha", "mult_adds_m", "params_m"),
    [(1.0, 569, 4.2), (0.75, 325, 2.6), (0.5, 149, 1.3), (0.25, 41, 0.5)],
)
def test_width_multiplier_reproduces_paper_table_6(alpha, mult_adds_m, params_m):
    report = mobilenet_v1_cost(alpha, 224, head="imagenet")
    assert round(report.mult_adds / 1e6) == mult_adds_m
    assert round(report.params / 1e6, 1) == params_m


# Table 7 (resolution multiplier, alpha 1): mult-adds in millions; the parameter count does not depend on it.
@pytest.mark.parametrize(("resolution", "mult_adds_m"), [(224, 569), (192, 418), (160, 290), (128, 186)])
def test_resolution_reproduces_paper_table_7(resolution, mult_adds_m):
    report = mobilenet_v1_cost(1.0, resolution)
    assert report.mult_adds / 1e6 == pytest.approx(mult_adds_m, rel=0.01)
    assert report.params == mobilenet_v1_cost(1.0, 224).params


def test_full_convolution_baseline_reproduces_paper_table_4_and_the_8_to_9x_saving():
    full = mobilenet_v1_cost(1.0, 224, standard_conv=True)
    separable = mobilenet_v1_cost(1.0, 224)
    assert full.mult_adds / 1e6 == pytest.approx(4866, rel=0.01)
    assert full.params / 1e6 == pytest.approx(29.3, rel=0.01)
    assert 8.0 < full.mult_adds / separable.mult_adds < 9.0
    assert {lc.kind for lc in full.layers} == {"conv", "fc"}


def test_single_layers_by_hand():
    """conv1 of Table 1 at alpha 1, 224 px: 3x3 depthwise on 112x112x32, then 1x1 pointwise 32 -> 64."""
    layers = {lc.name: lc for lc in mobilenet_v1_cost(1.0, 224).layers}
    first = layers["conv0"]
    assert (first.input_size, first.in_channels, first.out_channels, first.output_size) == (224, 3, 32, 112)
    assert first.mult_adds == 3 * 3 * 3 * 32 * 112 * 112
    dw, pw = layers["conv1_dw"], layers["conv1_pw"]
    assert (dw.params, dw.mult_adds) == (3 * 3 * 32, 3 * 3 * 32 * 112 * 112)
    assert (pw.params, pw.mult_adds) == (32 * 64, 32 * 64 * 112 * 112)
    fc = layers["fc"]
    assert (fc.mult_adds, fc.params) == (1024 * 1000, 1024 * 1000 + 1000)
    assert layers["conv13_pw"].output_size == 7


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize("resolution", [224, 112, 97])
def test_parameter_count_matches_the_built_module_with_imagenet_head(alpha, resolution):
    body = MobileNetV1(alpha, resolution)
    module = nn.Sequential(body, nn.Linear(body.out_channels, 1000))
    report = mobilenet_v1_cost(alpha, resolution, head="imagenet")
    assert report.params + report.bn_params == n_params(module)
    bare = mobilenet_v1_cost(alpha, resolution, head="none")
    assert bare.params + bare.bn_params == n_params(body)


@pytest.mark.parametrize(
    ("alpha", "resolution", "dim"), [(1.0, 224, 128), (0.5, 112, 128), (0.25, 96, 64), (0.75, 160, 256)]
)
def test_parameter_count_matches_build_model_with_embedding_head(alpha, resolution, dim):
    net = build_model(ModelConfig("mobilenet_v1", alpha, resolution, dim))
    report = mobilenet_v1_cost(alpha, resolution, head="embedding", embedding_dim=dim)
    assert report.params + report.bn_params == n_params(net)
    assert report.layers[-1].out_channels == dim


@pytest.mark.parametrize(("alpha", "resolution"), [(1.0, 224), (0.5, 112)])
def test_parameter_count_matches_the_full_convolution_module(alpha, resolution):
    body = MobileNetV1(alpha, resolution, standard_conv=True)
    module = nn.Sequential(body, nn.Linear(body.out_channels, 1000))
    report = mobilenet_v1_cost(alpha, resolution, standard_conv=True)
    assert report.params + report.bn_params == n_params(module)


def _layer_modules(net: MobileNetV1, standard_conv: bool) -> dict[str, nn.Module]:
    """Cost-model layer name -> the ConvBNReLU block of the built network that it prices."""
    out = {}
    for i, block in enumerate(net.features):
        if i == 0 or standard_conv:
            out[f"conv{i}"] = block
        else:
            out[f"conv{i}_dw"], out[f"conv{i}_pw"] = block.depthwise, block.pointwise
    return out


@pytest.mark.parametrize(
    ("alpha", "resolution", "standard_conv"),
    [(1.0, 224, False), (0.5, 112, False), (0.25, 97, False), (0.75, 33, False), (0.5, 113, True)],
)
def test_per_layer_shapes_match_the_feature_maps_of_the_built_module(alpha, resolution, standard_conv):
    net = MobileNetV1(alpha, resolution, standard_conv=standard_conv).eval()
    report = mobilenet_v1_cost(alpha, resolution, head="none", standard_conv=standard_conv)
    modules = _layer_modules(net, standard_conv)
    assert [lc.name for lc in report.layers] == list(modules)
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, tuple(out.shape)))
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
    for lc in report.layers:
        assert seen[lc.name] == (1, lc.out_channels, lc.output_size, lc.output_size), lc.name
        conv = modules[lc.name][0]
        assert (conv.in_channels, conv.out_channels) == (lc.in_channels, lc.out_channels), lc.name
        assert (conv.kernel_size[0], conv.stride[0]) == (lc.kernel, lc.stride), lc.name
        assert conv.groups == (lc.in_channels if lc.kind == "dw" else 1), lc.name
        # mult-adds = weights x output positions, the paper's count
        assert lc.mult_adds == conv.weight.numel() * lc.output_size**2, lc.name


def test_to_dict_totals_equal_the_sum_of_layers():
    d = mobilenet_v1_cost(0.5, 112, head="embedding").to_dict()
    assert d["mult_adds"] == sum(layer["mult_adds"] for layer in d["layers"])
    assert d["params"] == sum(layer["params"] for layer in d["layers"])
    assert d["layers"][-1]["name"] == "embedding"


@pytest.mark.parametrize(("alpha", "resolution"), [(0, 224), (1.5, 224), (-1, 224), (1.0, 16), (1.0, 224.0)])
def test_invalid_knobs_raise_invalid_config(alpha, resolution):
    with pytest.raises(InvalidConfig):
        mobilenet_v1_cost(alpha, resolution)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head"):
        mobilenet_v1_cost(1.0, 224, head="resnet")
