"""The LFW verification protocol, implemented once: used by training's validation and by ``visage eval``.

n-fold accuracy with the threshold chosen on the other folds (mean and std over folds), TAR at fixed FAR,
ROC AUC, and the best threshold over all pairs. Scores are similarities: higher means more alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass
class VerificationResult:
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    tar_at_far: dict[str, float]
    auc: float
    threshold: float
    pairs: int
    fpr: np.ndarray
    tpr: np.ndarray

    def to_dict(self) -> dict:
        out = {
            "accuracy": round(self.accuracy, 5),
            "accuracy_std": round(self.accuracy_std, 5),
            "fold_accuracies": [round(a, 5) for a in self.fold_accuracies],
            "auc": round(self.auc, 5),
            "threshold": round(self.threshold, 5),
            "pairs": self.pairs,
        }
        out.update({f"tar_at_far_{k}": round(v, 5) for k, v in self.tar_at_far.items()})
        return out


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising accuracy: midpoints between consecutive sorted scores (and both ends)."""
    s = np.sort(np.unique(scores))
    candidates = np.concatenate([[s[0] - 1e-6], (s[:-1] + s[1:]) / 2, [s[-1] + 1e-6]])
    # accuracy for every candidate at once via cumulative counts
    order = np.argsort(scores)
    ss, lab = scores[order], same[order]
    below = np.searchsorted(ss, candidates, side="left")  # pairs predicted "different"
    neg_below = np.concatenate([[0], np.cumsum(~lab)])[below]
    pos_above = lab.sum() - np.concatenate([[0], np.cumsum(lab)])[below]
    acc = (neg_below + pos_above) / len(scores)
    return float(candidates[int(np.argmax(acc))])


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """True-accept rate at the threshold where the false-accept rate is at most ``far``."""
    neg = np.sort(scores[~same])[::-1]
    k = int(np.floor(far * len(neg)))  # number of impostors allowed above the threshold
    thr = neg[k] if k < len(neg) else -np.inf
    return float(np.mean(scores[same] > thr))


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """Similarity above which only a fraction ``far`` of impostor pairs fall: the operating threshold."""
    return float(np.quantile(impostor_scores, 1.0 - far))


def protocol_verdicts(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each pair's "same person" verdict as the protocol makes it: at its fold's threshold, chosen on the others."""
    verdicts = np.zeros(len(scores), dtype=bool)
    for f in np.unique(folds):
        test = folds == f
        verdicts[test] = scores[test] > best_threshold(scores[~test], same[~test])
    return verdicts


def verify(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    scores, same, folds = np.asarray(scores, float), np.asarray(same, bool), np.asarray(folds)
    if len(np.unique(folds)) < 2:
        raise ValueError("the protocol needs at least 2 folds: each fold's threshold is chosen on the others")
    correct = protocol_verdicts(scores, same, folds) == same
    accs = [float(np.mean(correct[folds == f])) for f in np.unique(folds)]
    fpr, tpr, _ = roc_curve(same, scores)
    return VerificationResult(
        accuracy=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        fold_accuracies=accs,
        tar_at_far={"1e-3": tar_at_far(scores, same, 1e-3), "1e-2": tar_at_far(scores, same, 1e-2)},
        auc=float(roc_auc_score(same, scores)),
        threshold=best_threshold(scores, same),
        pairs=len(scores),
        fpr=fpr,
        tpr=tpr,
    )


def check_figure_path(path: str | Path) -> None:
    """Refuse a figure path matplotlib cannot write (``roc.txt``) before the work that the figure shows."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix and suffix not in FigureCanvasBase.get_supported_filetypes():
        kinds = ", ".join(sorted(FigureCanvasBase.get_supported_filetypes()))
        raise ValueError(f"cannot write a figure to {path}: use one of {kinds}")


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    for label, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib would add ".png" itself, and the caller would report the wrong name
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
