"""model.mobilenet: the network builders, their knobs and the shared embedding head."""

from __future__ import annotations

import pytest
import torch

from model.errors import InvalidConfig, VisageError
from model.mobilenet import (
    BACKBONES,
    FaceEmbeddingNet,
    MobileNetV1,
    ModelConfig,
    build_model,
    mobilenet_v1_face,
    scaled_channels,
)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig(alpha=0), "alpha"),
        (ModelConfig(alpha=1.5), "alpha"),
        (ModelConfig(alpha=-1), "alpha"),
        (ModelConfig(resolution=16), "input size"),
        (ModelConfig(resolution=2048), "input size"),
        (ModelConfig(backbone="resnet50"), "unknown backbone"),
        (ModelConfig(embedding_dim=4), "embedding_dim"),
    ],
)
def test_invalid_configs_raise_a_clear_invalid_config(config, message):
    with pytest.raises(InvalidConfig, match=message) as info:
        build_model(config)
    assert isinstance(info.value, VisageError) and info.value.code == "invalid_config"
    assert str(info.value) == info.value.detail


def test_unknown_backbone_message_lists_the_choices():
    with pytest.raises(InvalidConfig) as info:
        ModelConfig(backbone="resnet50").validate()
    for name in BACKBONES:
        assert name in info.value.detail


@pytest.mark.parametrize(("alpha", "resolution"), [(0, 224), (1.5, 224), (-1, 224), (1.0, 16)])
def test_mobilenet_v1_itself_refuses_bad_knobs(alpha, resolution):
    with pytest.raises(InvalidConfig):
        MobileNetV1(alpha, resolution)


def test_width_multiplier_scales_every_layer():
    assert [scaled_channels(c, 0.25) for c in (32, 64, 1024)] == [8, 16, 256]
    assert MobileNetV1(1.0, 224).out_channels == 1024
    assert MobileNetV1(0.5, 112).out_channels == 512
    assert scaled_channels(3, 0.1) == 1  # never zero channels


def test_full_convolution_variant_has_no_depthwise_layers():
    net = MobileNetV1(0.25, 64, standard_conv=True)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 14 and all(c.groups == 1 and c.kernel_size == (3, 3) for c in convs)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig("mobilenet_v1", 0.5, 112, 128),
        ModelConfig("mobilenet_v1", 0.25, 64, 32),
        ModelConfig("mobilenet_v2", 1.0, 112, 128),
        ModelConfig("mobilenet_v2", 0.5, 96, 64),
        ModelConfig("mobilenet_v3_small", 1.0, 112, 128),
        ModelConfig("mobilenet_v3_small", 0.5, 112, 256),
    ],
    ids=lambda c: f"{c.backbone}-a{c.alpha}-r{c.resolution}-d{c.embedding_dim}",
)
def test_every_backbone_gives_unit_norm_embeddings_of_the_configured_dim(config):
    torch.manual_seed(0)
    net = build_model(config)
    assert isinstance(net, FaceEmbeddingNet)
    x = torch.randn(4, 3, config.resolution, config.resolution)
    for m in net.modules():  # one training-mode pass sets the batch norms' running statistics to this batch's
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    with torch.no_grad():
        emb = net(x)
    assert emb.shape == (4, config.embedding_dim)
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert net.head[0].in_features == net.body.out_channels
    # the vectors depend on the input (not a constant direction)
    assert (emb @ emb.T).fill_diagonal_(0).abs().max() < 0.999


def test_mobilenet_v1_face_is_the_default_config():
    net = mobilenet_v1_face()
    ref = build_model(ModelConfig())
    assert ModelConfig() == ModelConfig("mobilenet_v1", 0.5, 112, 128)
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]
