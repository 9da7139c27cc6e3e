"""model.embedder and model.preprocess: aligned crops -> unit vectors, batch-independent, mirror-symmetric."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_model_bundle import calibrated_net, lfw_crops

from model.bundle import bundle_from_model, load_bundle, save_bundle
from model.embedder import Embedder
from model.mobilenet import ModelConfig
from model.preprocess import MEAN, STD, crops_to_tensor
from model.tta import shifted, tta_views


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A fresh (untrained) network, batch norms calibrated on real faces, saved and loaded as a bundle."""
    config = ModelConfig()
    path = tmp_path_factory.mktemp("embedder") / "fresh.pt"
    save_bundle(bundle_from_model(calibrated_net(config), config, {"model_version": "fresh-test"}), path)
    return load_bundle(path)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return lfw_crops(6)


@pytest.fixture(scope="module")
def embedder(bundle) -> Embedder:
    return Embedder(bundle, flip=True)


@pytest.fixture(scope="module")
def plain(bundle) -> Embedder:
    return Embedder(bundle, flip=False)


def test_unit_norm_float32_of_the_bundle_dim(embedder, crops):
    emb = embedder.embed(crops)
    assert emb.shape == (6, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert embedder.dim == 128 and embedder.model_version == "fresh-test"
    off_diagonal = (emb @ emb.T)[~np.eye(6, dtype=bool)]
    assert off_diagonal.max() < 0.999  # different photos, different vectors


def test_vectors_without_the_mirror_pass_carry_their_own_model_version(embedder, plain, crops):
    """VISAGE_FLIP=false kept the model version: a gallery mixed both kinds of vectors, with no stale faces to
    reindex, and scored them against each other."""
    assert plain.model_version == "fresh-test-noflip" != embedder.model_version
    assert np.abs(plain.embed(crops) - embedder.embed(crops)).max() > 1e-3  # they do differ


@pytest.mark.parametrize("flip", [True, False])
def test_batch_invariance(bundle, crops, flip):
    """A crop's embedding is the same alone, inside a batch, and split across several batches."""
    whole = Embedder(bundle, flip=flip).embed(crops)
    alone = np.stack([Embedder(bundle, flip=flip).embed(c)[0] for c in crops])
    chunked = Embedder(bundle, flip=flip, batch_size=4).embed(crops)
    np.testing.assert_allclose(alone, whole, atol=1e-5)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    reordered = Embedder(bundle, flip=flip).embed(crops[::-1])[::-1]
    np.testing.assert_allclose(reordered, whole, atol=1e-5)


def test_flip_averaging_is_mirror_symmetric(embedder, plain, crops):
    mirrored = np.ascontiguousarray(crops[:, :, ::-1])
    np.testing.assert_allclose(embedder.embed(mirrored), embedder.embed(crops), atol=1e-5)
    # without flip averaging a face and its mirror image really do differ, so the line above is not vacuous
    assert np.abs(plain.embed(mirrored) - plain.embed(crops)).max() > 1e-2


def test_flip_average_is_the_normalised_sum_of_both_views(embedder, plain, crops):
    a, b = plain.embed(crops), plain.embed(np.ascontiguousarray(crops[:, :, ::-1]))
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(crops), expected, atol=1e-5)


def test_embedder_runs_the_bundle_network_in_eval_mode(bundle, plain, crops):
    net = bundle.build()
    with torch.no_grad():
        expected = net(crops_to_tensor(crops, 112)).numpy()
    np.testing.assert_allclose(plain.embed(crops), expected, atol=1e-6)
    assert not plain.net.training


def test_single_crop_and_empty_batch(embedder, crops):
    assert embedder.embed(crops[0]).shape == (1, 128)
    empty = embedder.embed(np.zeros((0, 112, 112, 3), np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32


def test_crops_of_another_size_are_resized_to_the_network_input(bundle, plain, crops):
    big = np.repeat(np.repeat(crops[:2], 2, axis=1), 2, axis=2)  # 224x224, each pixel doubled
    x = crops_to_tensor(big, 112)
    assert x.shape == (2, 3, 112, 112)
    assert (x - crops_to_tensor(crops[:2], 112)).abs().mean() < 0.05  # the same picture at the network's size
    with torch.no_grad():
        expected = bundle.build()(x).numpy()
    np.testing.assert_allclose(plain.embed(big), expected, atol=1e-5)


def test_preprocess_normalisation_and_layout():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # red
    crop[:, 0, 2] = 100  # first column has some blue
    x = crops_to_tensor(crop, 112)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.full((112, 112), (255 - MEAN) / STD))
    assert torch.allclose(x[0, 1], torch.full((112, 112), -MEAN / STD))
    assert x[0, 2, 5, 0].item() == pytest.approx((100 - MEAN) / STD)  # row 5, column 0: channel-first layout
    assert x[0, 2, 0, 5].item() == pytest.approx(-MEAN / STD)
    assert x.min() >= -1.0 and x.max() <= 1.0
    small = crops_to_tensor(np.stack([crop, crop]), 64)
    assert small.shape == (2, 3, 64, 64) and small.is_contiguous()


def test_onnx_backend_gives_the_torch_vectors(tmp_path):
    """The service embeds through ONNX Runtime: it must agree with the PyTorch network it was exported from."""
    from model.export import export_onnx
    from model.mobilenet import build_model

    cfg = ModelConfig()
    torch_net = build_model(cfg)
    torch_net.train()
    torch_net(torch.randn(8, 3, 112, 112))  # move BN statistics off their defaults so the check means something
    bundle = load_bundle(save_bundle(bundle_from_model(torch_net.eval(), cfg), tmp_path / "b.pt"))
    crops = np.random.default_rng(1).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    a = Embedder(bundle).embed(crops)
    b = Embedder(bundle, backend="onnx").embed(crops)
    assert np.abs(a - b).max() < 1e-5
    assert export_onnx(bundle, tmp_path / "m.onnx").stat().st_size > 1_000_000


def test_a_companion_onnx_file_is_used_only_when_it_holds_the_same_weights(tmp_path):
    """The service loads ``<weights>.onnx`` instead of exporting at start-up, unless it is stale."""
    from model.export import DIGEST_KEY, companion_path, export_onnx, onnx_runner
    from model.mobilenet import build_model

    cfg = ModelConfig(alpha=0.25)
    path = save_bundle(bundle_from_model(build_model(cfg).eval(), cfg), tmp_path / "b.pt")
    bundle = load_bundle(path)
    assert companion_path(bundle) == tmp_path / "b.onnx"
    assert onnx_runner(bundle).metadata[DIGEST_KEY] == bundle.weights_digest()  # no companion: exported in memory

    export_onnx(bundle, tmp_path / "b.onnx")
    runner = onnx_runner(bundle)
    assert runner.metadata[DIGEST_KEY] == bundle.weights_digest()
    crops = np.random.default_rng(2).integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    assert np.abs(Embedder(bundle, backend="onnx").embed(crops) - Embedder(bundle).embed(crops)).max() < 1e-5

    other = load_bundle(save_bundle(bundle_from_model(build_model(cfg).eval(), cfg), tmp_path / "other.pt"))
    export_onnx(other, tmp_path / "b.onnx")  # a stale companion: the graph of other weights
    assert onnx_runner(bundle).metadata[DIGEST_KEY] == bundle.weights_digest() != other.weights_digest()


def test_a_shifted_view_moves_the_content_and_fills_the_edge_with_grey():
    """Hand-made 1-channel 4x5 image: the content moves by whole pixels; uncovered pixels are 0 (mid-grey)."""
    x = torch.arange(1, 21, dtype=torch.float32).reshape(1, 1, 4, 5)
    right = shifted(x, 2, 0)
    assert torch.equal(right[0, 0, :, 2:], x[0, 0, :, :3]) and not right[0, 0, :, :2].any()
    up = shifted(x, 0, -1)
    assert torch.equal(up[0, 0, :3], x[0, 0, 1:]) and not up[0, 0, 3].any()
    assert torch.equal(shifted(x, 0, 0), x)
    views = tta_views(x, 1)
    assert len(views) == 5 and views[0] is x and tta_views(x, 0) == [x]
    # right, left, down, up: each view's sum loses exactly the column or row pushed out of the frame
    lost = [x[0, 0, :, -1].sum(), x[0, 0, :, 0].sum(), x[0, 0, -1].sum(), x[0, 0, 0].sum()]
    for view, gone in zip(views[1:], lost, strict=True):
        assert view.sum() == x.sum() - gone


def test_test_time_views_average_the_shifted_copies_and_their_mirrors(bundle, crops):
    """A bundle with ``views.shift`` embeds each face as the normalised sum of 10 passes: 5 views x mirror."""
    shifted_bundle = replace(bundle, metadata={**bundle.metadata, "views": {"shift": 3}})
    embedder = Embedder(shifted_bundle)
    assert embedder.shift == 3 and Embedder(shifted_bundle, views=False).shift == 0 and Embedder(bundle).shift == 0
    net = bundle.build()
    with torch.no_grad():
        x = crops_to_tensor(crops, 112)
        total = sum(net(v) + net(torch.flip(v, dims=[3])) for v in tta_views(x, 3))
    expected = torch.nn.functional.normalize(total, dim=1).numpy()
    got = embedder.embed(crops)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the views change the vector, so they must be part of the model version
    assert np.sum(got * Embedder(bundle).embed(crops), axis=1).max() < 0.999
    onnx = Embedder(shifted_bundle, backend="onnx").embed(crops)
    assert np.abs(onnx - got).max() < 5e-5  # ten float32 passes summed: a little more rounding than one


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True, 15])  # 15: more than an eighth of the 112 px input
def test_a_bundle_with_an_unreadable_shift_is_refused(bundle, bad):
    with pytest.raises(ValueError, match="views.shift"):
        Embedder(replace(bundle, metadata={**bundle.metadata, "views": {"shift": bad}}))
