"""The LFW pairs format: a header ``n_folds<TAB>n`` then, per fold, n matched and n mismatched lines."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from training.paths import read_text


@dataclass(frozen=True)
class Pair:
    fold: int  # 0-based
    left: str  # image path relative to the images folder
    right: str
    same: bool


def lfw_image(name: str, number: int | str, ext: str = ".jpg") -> str:
    if not re.fullmatch(r"[0-9]+", str(number)) or int(number) < 1:  # ("-1" named Name_-001.jpg; int() also took "1_0")
        raise ValueError(f"image numbers are whole numbers from 1, got {number!r}")
    return f"{name}/{name}_{int(number):04d}{ext}"


def read_pairs(path: str | Path) -> tuple[int, list[Pair]]:
    """Parse a pairs file in LFW format; the header gives the number of folds and pairs per class per fold."""
    lines = read_text(path, "pairs file").splitlines()
    numbered = [(no, ln.split("\t")) for no, ln in enumerate(lines, 1) if ln.strip()]
    header = "the first line must be '<folds>\\t<pairs per fold and class>', two whole numbers above 0"
    if numbered and len(numbered[0][1]) == 1 and len(numbered[0][1][0].split()) == 2:
        header += " separated by a tab, not spaces (the LFW format's fields are tab-separated on every line)"
    if not numbered or len(numbered[0][1]) != 2:
        raise ValueError(f"{path}: {header}")
    try:
        n_folds, n = (int(v) for v in numbered[0][1])
    except ValueError:
        raise ValueError(f"{path}: {header}") from None
    if n_folds < 1 or n < 1:
        raise ValueError(f"{path}: {header}")
    body = numbered[1:]
    if len(body) != n_folds * 2 * n:
        raise ValueError(f"{path}: expected {n_folds * 2 * n} pair lines for header {n_folds}x{n}, got {len(body)}")
    pairs = []
    for i, (no, parts) in enumerate(body):
        if len(parts) not in (3, 4):
            raise ValueError(f"{path}: line {no} has {len(parts)} fields, expected 3 or 4")
        matched = i % (2 * n) < n  # each fold: n matched pairs, then n mismatched (a one-class fold has no ROC)
        if len(parts) != (3 if matched else 4):
            raise ValueError(f"{path}: line {no} should be a {'matched' if matched else 'mismatched'} pair "
                             f"({'name a b' if matched else 'name a other b'}): each fold holds {n} matched "
                             f"lines, then {n} mismatched ones")
        try:
            pairs.append(_pair(i // (2 * n), parts))
        except ValueError:
            raise ValueError(f"{path}: line {no}: image numbers must be whole numbers from 1, got {parts}") from None
    return n_folds, pairs


def _pair(fold: int, parts: list[str]) -> Pair:
    """``name a b`` (the same person) or ``name a other b`` (two people)."""
    if len(parts) == 3:
        return Pair(fold, lfw_image(parts[0], parts[1]), lfw_image(parts[0], parts[2]), True)
    return Pair(fold, lfw_image(parts[0], parts[1]), lfw_image(parts[2], parts[3]), False)


def chosen_folds(folds: Iterable[int], n_folds: int, name: str) -> set[int]:
    """1-based fold numbers -> 0-based, refused unless each is a fold of the pairs file and there are at least 2
    (the protocol chooses each fold's threshold on the others): found before any image is read, not after."""
    folds = set(folds)
    bad = sorted(f for f in folds if not 1 <= f <= n_folds)
    if bad or len(folds) < 2:
        raise ValueError(f"{name} must be at least 2 fold numbers from 1 to {n_folds} (the pairs file's folds: the "
                         f"protocol chooses each fold's threshold on the others); got {sorted(folds)}")
    return {f - 1 for f in folds}


def people_in_folds(pairs: list[Pair], folds: set[int]) -> set[str]:
    """Identities named in the given folds (0-based): held out of training to validate on those folds."""
    return {p.split("/")[0] for pair in pairs if pair.fold in folds for p in (pair.left, pair.right)}
