"""model.score_norm on hand-made embeddings whose right scores are known, and its round trip through a bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.bundle import bundle_from_model, load_bundle, save_bundle
from model.errors import WeightsError
from model.mobilenet import ModelConfig, build_model
from model.score_norm import CohortNorm, cohort_from


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_plain_scoring_is_the_cosine():
    rng = np.random.default_rng(0)
    a, b = unit_rows(rng.normal(size=(5, 8))), unit_rows(rng.normal(size=(7, 8)))
    plain = CohortNorm.plain(8)
    assert not plain.enabled and plain.tag == "cosine"
    np.testing.assert_array_equal(plain.offsets(a), np.zeros(5))
    np.testing.assert_allclose(plain.matrix(a, b), a @ b.T, atol=1e-6)
    np.testing.assert_allclose(plain.pairs(a, b[:5]), np.sum(a * b[:5], axis=1), atol=1e-6)


def test_offset_is_the_mean_of_the_k_nearest_cohort_cosines():
    """Cohort = the 4 axes of R^4. x = (1, 1, 0, 0)/sqrt2 has cosines (.707, .707, 0, 0) to them: top-2 mean .707,
    top-3 mean .471; the axis e3 has cosines (0, 0, 1, 0): top-2 mean 0.5."""
    norm = CohortNorm(np.eye(4, dtype=np.float32), k=2)
    x = unit_rows(np.array([[1, 1, 0, 0]], dtype=np.float32))
    e3 = np.array([[0, 0, 1, 0]], dtype=np.float32)
    assert norm.offsets(x)[0] == pytest.approx(np.sqrt(0.5), abs=1e-6)
    assert norm.offsets(e3)[0] == pytest.approx(0.5, abs=1e-6)
    assert CohortNorm(np.eye(4, dtype=np.float32), k=3).offsets(x)[0] == pytest.approx(np.sqrt(0.5) * 2 / 3, abs=1e-6)
    # score = cosine - (offset(x) + offset(e3)) / 2
    assert norm.score(x, e3) == pytest.approx(0.0 - 0.5 * (np.sqrt(0.5) + 0.5), abs=1e-6)


def test_a_hub_loses_the_lead_it_had_over_an_ordinary_face():
    """A hub sits near the crowd (cohort): under the plain cosine the probe finds it more similar than the probe's
    actual match; after subtracting each face's closeness to the crowd the match wins."""
    rng = np.random.default_rng(1)
    e = np.eye(16, dtype=np.float32)
    cohort = unit_rows(e[0] + 0.3 * rng.normal(size=(200, 16)))  # the crowd: around axis 0
    probe = unit_rows((0.6 * e[0] + 0.8 * e[1])[None])[0]
    hub = unit_rows((0.95 * e[0] + 0.31 * e[1])[None])[0]  # in the crowd
    match = unit_rows((0.1 * e[0] + 0.9 * e[1] + 0.42 * e[2])[None])[0]  # the probe's identity, away from it
    assert probe @ hub > probe @ match + 0.03  # the plain cosine prefers the hub (0.82 vs 0.78)
    norm = CohortNorm(cohort, k=10)
    assert norm.offsets(hub)[0] > norm.offsets(match)[0] + 0.3  # 0.84 vs 0.48
    assert norm.score(probe, match) > norm.score(probe, hub) + 0.1  # 0.18 vs 0.03


def test_the_augmented_inner_product_gives_the_exact_scores():
    rng = np.random.default_rng(2)
    norm = CohortNorm(unit_rows(rng.normal(size=(64, 8))), k=5)
    gallery, probes = unit_rows(rng.normal(size=(30, 8))), unit_rows(rng.normal(size=(4, 8)))
    queries, shift = norm.query_vectors(probes)
    via_index = queries @ norm.gallery_vectors(gallery).T + shift[:, None]
    np.testing.assert_allclose(via_index, norm.matrix(probes, gallery), atol=1e-5)
    np.testing.assert_allclose(norm.pairs(probes, gallery[:4]), np.diag(norm.matrix(probes, gallery[:4])), atol=1e-5)
    # a face set against itself (calibration, benches) reuses its offsets and gives the same scores; not bit for
    # bit: numpy multiplies x @ x.T with a symmetric BLAS routine, whose last bit differs from x @ copy.T on some CPUs
    np.testing.assert_allclose(norm.matrix(gallery, gallery), norm.matrix(gallery, gallery.copy()), rtol=0, atol=1e-6)


def test_the_cap_lets_a_hub_match_an_identical_copy_of_itself():
    """A face inside a tight crowd has an offset near 1, so against its own copy it scores near 0, below a strict
    threshold; capped offsets keep that self-score at 1 - cap, and faces under the cap score as before."""
    rng = np.random.default_rng(4)
    e = np.eye(8, dtype=np.float32)
    crowd = unit_rows(e[0] + 0.05 * rng.normal(size=(50, 8)))
    hub, loner = crowd[:1].copy(), e[None, 5]
    plain = CohortNorm(crowd, k=10)
    assert plain.score(hub, hub) < 0.05  # fails a threshold of, say, 0.1 against itself
    capped = CohortNorm(crowd, k=10, cap=0.8)
    assert capped.score(hub, hub) == pytest.approx(0.2, abs=1e-6)
    assert capped.offsets(loner)[0] == plain.offsets(loner)[0] < 0.8
    assert capped.tag != plain.tag  # an index built under one rule is stale under the other
    with pytest.raises(ValueError, match="cap"):
        CohortNorm(crowd, k=10, cap=0.0)


def test_k_must_fit_the_cohort():
    with pytest.raises(ValueError, match="between 1 and the cohort size"):
        CohortNorm(np.eye(4, dtype=np.float32), k=5)
    assert cohort_from(np.eye(3, dtype=np.float32), k=16).k == 3


def test_the_cohort_travels_in_the_bundle_and_scores_identically_after_loading(tmp_path):
    config = ModelConfig("mobilenet_v1", 0.25, 96, 32)
    torch.manual_seed(0)
    bundle = bundle_from_model(build_model(config), config, {"model_version": "cohort-test"})
    rng = np.random.default_rng(3)
    cohort = cohort_from(unit_rows(rng.normal(size=(100, 32))), k=7)  # float16-rounded, as stored
    bundle.score_norm = CohortNorm(cohort.cohort, cohort.k, cap=0.3)
    probes = unit_rows(rng.normal(size=(6, 32)))
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b.pt"))
    assert loaded.scorer.k == 7 and loaded.scorer.cap == 0.3 and loaded.scorer.tag == bundle.scorer.tag
    np.testing.assert_array_equal(loaded.scorer.matrix(probes, probes), bundle.scorer.matrix(probes, probes))
    # a bundle without one scores by cosine
    bundle.score_norm = None
    assert load_bundle(save_bundle(bundle, tmp_path / "plain.pt")).scorer.tag == "cosine"


def test_a_cohort_of_the_wrong_width_is_a_weights_error(tmp_path):
    config = ModelConfig("mobilenet_v1", 0.25, 96, 32)
    bundle = bundle_from_model(build_model(config), config)
    path = save_bundle(bundle, tmp_path / "b.pt")
    payload = torch.load(path, weights_only=True)
    payload["score_norm"] = {"method": "cohort-mean", "k": 2, "cohort": torch.zeros(10, 16, dtype=torch.float16)}
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="damaged score cohort"):
        load_bundle(path)
