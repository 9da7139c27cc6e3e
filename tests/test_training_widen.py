"""training.widen: a wider MobileNet v1 computes exactly what the narrow one did (real faces, shipped weights),
and a fine-tune can start from a narrower bundle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import photo

from model.bundle import DEFAULT_WEIGHTS, Bundle, bundle_from_model, load_bundle, save_bundle
from model.embedder import embed_batches
from model.mobilenet import ModelConfig, build_model
from training.config import TrainConfig
from training.loop import initial_weights
from training.widen import channel_map, widen_state_dict


@pytest.fixture(scope="module")
def crops(pipeline) -> np.ndarray:
    names = ["obama.jpg", "obama2.jpg", "biden.jpg"]
    return np.stack([pipeline.faces(photo(n).read_bytes(), embed=False)[0].crop for n in names])


@pytest.fixture(scope="module")
def shipped() -> Bundle:
    return load_bundle(DEFAULT_WEIGHTS)  # alpha 0.5


def _embed(config: ModelConfig, state: dict, crops: np.ndarray) -> np.ndarray:
    net = build_model(config).eval()
    net.load_state_dict(state)
    with torch.inference_mode():
        return embed_batches(crops, net, config.resolution, config.embedding_dim, flip=False)


def test_channel_map_keeps_originals_and_copies_existing_channels():
    m = channel_map(4, 10, torch.Generator().manual_seed(0))
    assert m[:4].tolist() == [0, 1, 2, 3] and len(m) == 10 and int(m.max()) < 4
    with pytest.raises(ValueError):
        channel_map(10, 4, torch.Generator())


@pytest.mark.parametrize("alpha", [0.75, 1.0])
def test_widened_network_embeds_real_faces_exactly_as_the_narrow_one(shipped, crops, alpha):
    wide = dataclasses.replace(shipped.config, alpha=alpha)
    before = _embed(shipped.config, shipped.state_dict, crops)
    after = _embed(wide, widen_state_dict(shipped.state_dict, shipped.config, wide, noise=0.0), crops)
    assert np.abs(before - after).max() < 1e-5
    # and they are meaningful embeddings (one crop, no mirror, plain cosine: Obama twice 0.60, Obama-Biden 0.49
    # with the session-15 weights; an untrained network puts every face near the same direction)
    same, other = before[0] @ before[1], before[0] @ before[2]
    assert other < 0.55 and same - other > 0.08


def test_noise_breaks_the_symmetry_of_copies_but_keeps_the_function(shipped, crops):
    wide = dataclasses.replace(shipped.config, alpha=1.0)
    state = widen_state_dict(shipped.state_dict, shipped.config, wide, noise=0.01)
    exact = widen_state_dict(shipped.state_dict, shipped.config, wide, noise=0.0)
    w = state["body.features.1.pointwise.0.weight"]  # 64 outputs at alpha 1.0 from 32 at 0.5
    assert torch.equal(w[:32], exact["body.features.1.pointwise.0.weight"][:32])  # the originals are untouched
    assert not any(torch.equal(w[j], w[k]) for j in range(32, 64) for k in range(32))  # no copy equals one
    cos = np.sum(_embed(shipped.config, shipped.state_dict, crops) * _embed(wide, state, crops), axis=1)
    assert cos.min() > 0.99


def test_narrowing_or_another_embedding_size_is_refused(shipped):
    with pytest.raises(ValueError, match="narrow"):
        widen_state_dict(shipped.state_dict, shipped.config, dataclasses.replace(shipped.config, alpha=0.25))
    with pytest.raises(ValueError, match="embedding"):
        widen_state_dict(shipped.state_dict, shipped.config, dataclasses.replace(shipped.config, embedding_dim=64))


def test_a_fine_tune_starts_from_a_narrower_bundle_and_refuses_other_shapes(tmp_path):
    narrow = ModelConfig(alpha=0.25, resolution=96, embedding_dim=32)
    path = save_bundle(bundle_from_model(build_model(narrow), narrow), tmp_path / "narrow.pt")
    cfg = TrainConfig(alpha=0.5, resolution=112, embedding_dim=32, init_weights=str(path))
    build_model(cfg.model).load_state_dict(initial_weights(cfg))  # strict: every tensor has the wide shape
    with pytest.raises(ValueError, match="this run trains .*embedding size differs"):
        initial_weights(dataclasses.replace(cfg, embedding_dim=64))
