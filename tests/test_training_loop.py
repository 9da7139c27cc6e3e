"""training.loop's pure parts: the learning-rate schedule, threshold calibration and the bundle metadata.

(The loop itself needs prepared data; its smoke test lives elsewhere.)
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from model.bundle import bundle_from_model
from model.cost import mobilenet_v1_cost
from model.mobilenet import build_model
from model.score_norm import CohortNorm
from training.config import TrainConfig
from training.loop import FARS, all_pairs, all_pairs_tar, calibrate, few_impostor_warnings, finished_metadata, lr_factor


def test_warmup_then_cosine_to_zero():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup) == pytest.approx(0.1)
    assert lr_factor(4, total, warmup) == pytest.approx(0.5)
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    factors = [lr_factor(s, total, warmup) for s in range(total)]
    assert factors[:10] == sorted(factors[:10]) and factors[10:] == sorted(factors[10:], reverse=True)
    assert lr_factor(0, 50, 0) == pytest.approx(1.0)  # no warm-up
    assert lr_factor(25, 50, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_calibrate_thresholds_on_impostor_pairs_only():
    """Each person's 4 faces are near-identical (similarity ~1): if those genuine pairs (2 % of all pairs)
    leaked into the impostor scores, the FAR 1e-3 threshold would be ~1."""
    rng = np.random.default_rng(0)
    identities = [f"p{i // 4}" for i in range(160)]  # 40 people x 4 faces
    centres = rng.normal(size=(40, 16))
    emb = np.repeat(centres, 4, axis=0) + 0.01 * rng.normal(size=(160, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    thresholds = calibrate(all_pairs(emb.astype(np.float32), identities, CohortNorm.plain(16)))
    assert set(thresholds) == set(FARS) == {"1e-2", "1e-3", "1e-4"}
    impostor = np.array(
        [emb[i] @ emb[j] for i, j in combinations(range(160), 2) if identities[i] != identities[j]]
    )
    assert len(impostor) == 160 * 159 // 2 - 40 * 6
    for far, thr in thresholds.items():
        assert thr == round(thr, 4) and thr < 0.95
        assert thr == pytest.approx(np.quantile(impostor, 1 - float(far)), abs=1e-4)
        assert thr >= np.quantile(impostor, 1 - float(far))  # rounded up: never a little more lenient
        assert np.mean(impostor > thr) <= float(far) + 1 / len(impostor)
    assert thresholds["1e-4"] >= thresholds["1e-3"]


def test_a_collapsed_network_gets_thresholds_that_refuse_its_impostors_and_a_warning():
    """Every score within 1e-4 of 0.02 (an untrained network): thresholds rounded to the nearest 4th decimal sat
    below the impostors and let 82 % of them through; 316 impostor pairs set a "FAR 1e-4" with no word said."""
    rng = np.random.default_rng(1)
    scores = (0.01999998 + 3e-7 * rng.random(400)).astype(np.float32)
    same = np.zeros(400, dtype=bool)
    same[:84] = True
    thresholds = calibrate((scores, same))
    assert all(np.mean(scores[~same] > thr) == 0.0 for thr in thresholds.values())
    assert few_impostor_warnings(316) == [w for w in few_impostor_warnings(316) if "316 impostor pairs" in w]
    assert [w.split(" rests")[0] for w in few_impostor_warnings(316)] == [
        "the threshold at FAR 1e-3", "the threshold at FAR 1e-4"]
    assert few_impostor_warnings(3_317_942) == []


def test_all_pairs_tar_counts_every_genuine_pair_above_each_threshold():
    """Hand-made: 3 people x 3 faces. Person a's faces agree (cos 1), b's are orthogonal to each other (cos 0),
    c's pairwise cos is 0.5: at threshold 0.4, a's 3 and c's 3 genuine pairs pass, b's 3 do not."""
    e = np.eye(8)
    c_faces = [np.sqrt(0.5) * (e[4] + e[5 + i]) for i in range(3)]  # pairwise cos 0.5
    emb = np.stack([e[0], e[0], e[0], e[1], e[2], e[3], *c_faces])
    identities = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    out = all_pairs_tar(all_pairs(emb, identities, CohortNorm.plain(8)), {"1e-3": 0.4, "1e-4": 0.6})
    assert (out["genuine_pairs"], out["impostor_pairs"]) == (9, 27)
    assert out["tar_at_far_1e-3"] == pytest.approx(6 / 9, abs=1e-4)
    assert out["tar_at_far_1e-4"] == pytest.approx(3 / 9, abs=1e-4)


def test_calibration_uses_the_scores_the_bundle_will_serve():
    """With a cohort, thresholds are quantiles of the normalised impostor scores, not of the cosines."""
    rng = np.random.default_rng(1)
    identities = [f"p{i // 2}" for i in range(120)]
    emb = rng.normal(size=(120, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    cohort = rng.normal(size=(50, 16))
    scorer = CohortNorm((cohort / np.linalg.norm(cohort, axis=1, keepdims=True)).astype(np.float32), k=5)
    full = scorer.matrix(emb, emb)
    impostor = np.array([full[i, j] for i, j in combinations(range(120), 2) if identities[i] != identities[j]])
    thresholds = calibrate(all_pairs(emb, identities, scorer))
    assert thresholds["1e-2"] == pytest.approx(np.quantile(impostor, 0.99), abs=1e-4)
    assert thresholds != calibrate(all_pairs(emb, identities, CohortNorm.plain(16)))


def test_finished_metadata_matches_the_cost_model():
    cfg = TrainConfig(alpha=0.25, resolution=96, embedding_dim=64)
    net = build_model(cfg.model)
    bundle = bundle_from_model(net, cfg.model)
    val = {"accuracy": 0.9, "accuracy_std": 0.01}
    meta = finished_metadata(
        cfg, bundle, val, {"1e-3": 0.4, "1e-4": 0.5}, [{"epoch": 1}], 12.34, torch.device("cpu")
    )
    cost = mobilenet_v1_cost(0.25, 96, head="embedding", embedding_dim=64)
    assert meta["params"] == cost.params + cost.bn_params == sum(p.numel() for p in net.parameters())
    assert meta["mult_adds"] == cost.mult_adds
    assert meta["model_version"].startswith("mobilenet_v1-a0.25-r96-d64-")
    assert meta["model_version"].endswith(bundle.weights_digest()[:10])
    assert meta["thresholds"] == {"1e-3": 0.4, "1e-4": 0.5}
    assert meta["validation"]["accuracy"] == 0.9 and meta["validation"]["folds"] == cfg.val_folds
    assert meta["input_size"] == 96 and meta["epochs_run"] == 1 and meta["train_seconds"] == 12.3
    assert meta["recipe"] == cfg.to_dict()


def test_geometry_scaled_widens_rotation_scale_and_shift_only():
    from training.data import Augment
    from training.loop import geometry_scaled

    base = Augment()
    wide = geometry_scaled(base, 2.0)
    assert (wide.max_rotate_deg, wide.max_scale, wide.max_shift) == pytest.approx(
        (2 * base.max_rotate_deg, 2 * base.max_scale, 2 * base.max_shift))
    assert (wide.flip, wide.colour, wide.grey) == (base.flip, base.colour, base.grey)
    assert geometry_scaled(base, 1.0) == base


def test_weight_average_is_an_exponential_moving_average_of_weights_and_bn_statistics():
    from training.loop import weight_average

    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = weight_average(net, 0.75)
    history = []
    for value in (1.0, 2.0, 4.0):  # the first update copies, each later one moves a quarter of the way
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].running_mean.fill_(-value)
        ema.update_parameters(net)
        history.append((ema.module[0].weight.detach()[0, 0].item(), ema.module[1].running_mean[0].item()))
    assert history == [(1.0, -1.0), (1.25, -1.25), (1.9375, -1.9375)]
    assert net[0].weight.detach()[0, 0].item() == 4.0  # the trained network itself is untouched


def test_ema_must_be_a_decay_below_one():
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="ema"):
            TrainConfig(ema=bad).validate()
    TrainConfig(ema=0.999).validate()
