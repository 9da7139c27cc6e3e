"""training.evaluate: the LFW verification protocol on synthetic scores whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate import best_threshold, plot_roc, protocol_verdicts, tar_at_far, threshold_at_far, verify


def separable(folds: int = 10, per_fold: int = 20, seed: int = 0):
    """Genuine scores in (0.6, 1.0), impostors in (-0.5, 0.4): every threshold in [0.4, 0.6] is perfect."""
    rng = np.random.default_rng(seed)
    same = np.tile(np.repeat([True, False], per_fold // 2), folds)
    scores = np.where(same, rng.uniform(0.6, 1.0, same.size), rng.uniform(-0.5, 0.4, same.size))
    return scores, same, np.repeat(np.arange(folds), per_fold)


def test_perfectly_separable_scores_give_accuracy_one():
    scores, same, folds = separable()
    result = verify(scores, same, folds)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.fold_accuracies == [1.0] * 10
    assert result.auc == 1.0 and result.pairs == 200
    assert scores[~same].max() < result.threshold < scores[same].min()
    assert result.tar_at_far == {"1e-3": 1.0, "1e-2": 1.0}


def test_one_outlier_costs_exactly_its_fold():
    scores, same, folds = separable()
    outlier = np.nonzero(~same & (folds == 0))[0][0]
    scores[outlier] = 0.95  # an impostor scoring like a genuine pair
    result = verify(scores, same, folds)
    assert result.fold_accuracies[0] == pytest.approx(19 / 20)
    assert result.fold_accuracies[1:] == [1.0] * 9
    assert result.accuracy == pytest.approx(0.995)
    assert result.accuracy_std == pytest.approx(np.std([0.95] + [1.0] * 9))


def test_thresholds_are_chosen_on_the_other_folds():
    """Fold 0's scores are shifted down: a threshold fitted on fold 0 would be perfect for it, but the
    protocol picks it on folds 1-2 (midway between 0.2 and 0.8), so fold 0's genuine pairs (0.32-0.38) are
    rejected."""
    same = np.tile([True] * 5 + [False] * 5, 3)
    folds = np.repeat([0, 1, 2], 10)
    scores = np.where(same, 0.8, 0.2).astype(float)
    scores[:10] = np.where(same[:10], 0.35, 0.1)
    scores[1:5] += np.linspace(-0.03, 0.03, 4)
    result = verify(scores, same, folds)
    assert result.fold_accuracies[0] == 0.5  # every genuine pair of fold 0 falls below the threshold
    assert result.fold_accuracies[1:] == [1.0, 1.0]
    verdicts = protocol_verdicts(scores, same, folds)  # the same verdicts, pair by pair
    assert not verdicts[:10].any() and (verdicts[10:] == same[10:]).all()


def test_tar_at_far_on_known_scores():
    impostors = np.arange(1000) / 1000  # 0.000 ... 0.999
    genuine = np.array([0.9995] * 20 + [0.995] * 30 + [0.3] * 50)
    scores = np.concatenate([genuine, impostors])
    same = np.concatenate([np.ones(100, bool), np.zeros(1000, bool)])
    # FAR 1e-3: one impostor (0.999) may pass -> threshold 0.998: only the 0.9995 group is accepted
    assert tar_at_far(scores, same, 1e-3) == pytest.approx(0.2)
    # FAR 1e-2: ten impostors (0.990 ... 0.999) may pass -> threshold 0.989: the 0.995 group joins
    assert tar_at_far(scores, same, 1e-2) == pytest.approx(0.5)
    assert tar_at_far(scores, same, 1.0) == pytest.approx(1.0)
    result = verify(scores, same, np.arange(scores.size) % 5)
    assert result.tar_at_far == {"1e-3": pytest.approx(0.2), "1e-2": pytest.approx(0.5)}


def test_threshold_at_far_lets_through_at_most_that_fraction_of_impostors():
    impostors = np.random.default_rng(3).normal(0.0, 0.1, 100_000)
    for far in (1e-2, 1e-3, 1e-4):
        thr = threshold_at_far(impostors, far)
        assert np.mean(impostors > thr) == pytest.approx(far, rel=0.05, abs=2e-5)
    assert threshold_at_far(impostors, 1e-4) > threshold_at_far(impostors, 1e-3)


def brute_force_best_accuracy(scores: np.ndarray, same: np.ndarray) -> float:
    candidates = np.concatenate([[scores.min() - 1], scores, scores + 1e-9])
    return max(np.mean((scores > t) == same) for t in candidates)


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    same = rng.random(300) < 0.5
    scores = np.where(same, rng.normal(0.6, 0.2, 300), rng.normal(0.3, 0.2, 300))
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    thr = best_threshold(scores, same)
    assert np.mean((scores > thr) == same) == pytest.approx(brute_force_best_accuracy(scores, same))


def test_best_threshold_at_the_ends():
    same = np.array([True, True, True])
    scores = np.array([0.1, 0.2, 0.3])
    assert best_threshold(scores, same) < 0.1  # accept everything
    assert best_threshold(scores, ~same) >= 0.3  # reject everything


def test_result_dict_and_roc_plot(tmp_path):
    scores, same, folds = separable()
    scores[0] = -0.9  # one of the 100 genuine pairs ranks below all 100 impostors: AUC = 0.99
    result = verify(scores, same, folds)
    d = json.loads(json.dumps(result.to_dict()))
    assert {
        "accuracy",
        "accuracy_std",
        "fold_accuracies",
        "auc",
        "threshold",
        "pairs",
        "tar_at_far_1e-3",
        "tar_at_far_1e-2",
    } <= set(d)
    assert d["auc"] == pytest.approx(0.99)
    assert result.fpr[0] == 0.0 and result.tpr[-1] == 1.0
    png = plot_roc({"test": (result.fpr, result.tpr)}, tmp_path / "plots" / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_fold_is_a_clear_error_or_a_result():
    """``visage eval --folds 3`` passes one fold: there are no other folds to choose its threshold on. That
    must be a clear ValueError (or a documented fallback), not an IndexError from an empty array."""
    scores, same, _ = separable(folds=1)
    try:
        result = verify(scores, same, np.zeros(scores.size, int))
    except ValueError as exc:
        assert "fold" in str(exc)
    else:
        assert result.accuracy == 1.0 and result.pairs == scores.size
