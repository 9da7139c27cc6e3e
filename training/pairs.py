"""The LFW pairs format: a header ``n_folds<TAB>n`` then, per fold, n matched and n mismatched lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    fold: int  # 0-based
    left: str  # image path relative to the images folder
    right: str
    same: bool


def lfw_image(name: str, number: int | str, ext: str = ".jpg") -> str:
    return f"{name}/{name}_{int(number):04d}{ext}"


def read_pairs(path: str | Path) -> tuple[int, list[Pair]]:
    """Parse a pairs file in LFW format; the header gives the number of folds and pairs per class per fold."""
    lines = [ln.split("\t") for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError(f"{path}: the first line must be '<folds>\\t<pairs per fold and class>'")
    n_folds, n = (int(v) for v in lines[0])
    body = lines[1:]
    if len(body) != n_folds * 2 * n:
        raise ValueError(f"{path}: expected {n_folds * 2 * n} pair lines for header {n_folds}x{n}, got {len(body)}")
    pairs = []
    for i, parts in enumerate(body):
        fold = i // (2 * n)
        if len(parts) == 3:
            pairs.append(Pair(fold, lfw_image(parts[0], parts[1]), lfw_image(parts[0], parts[2]), True))
        elif len(parts) == 4:
            pairs.append(Pair(fold, lfw_image(parts[0], parts[1]), lfw_image(parts[2], parts[3]), False))
        else:
            raise ValueError(f"{path}: line {i + 2} has {len(parts)} fields, expected 3 or 4")
    return n_folds, pairs


def people_in_folds(pairs: list[Pair], folds: set[int]) -> set[str]:
    """Identities named in the given folds (0-based): held out of training to validate on those folds."""
    return {p.split("/")[0] for pair in pairs if pair.fold in folds for p in (pair.left, pair.right)}
