"""Test-time augmentation (TTA): each aligned crop embedded as it is and moved a few pixels up, down, left and
right, the vectors averaged.

Averaging the aligned crop with four 3-pixel shifts raised the held-out all-pairs TAR at every operating point
(docs/TRAINING.md, "Test-time views"): alignment jitters by a pixel or two between photos of one person, and the
average is steadier than any single framing. The shift changes every embedding, so it belongs to the weights
bundle (``metadata["views"]``) like the thresholds calibrated on it, and is part of the model version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # right, left, down, up


def max_shift(resolution: int) -> int:
    """The largest shift allowed: an eighth of the input, beyond which the views stop being the same face."""
    return resolution // 8


def check_shift(shift: Any, resolution: int, name: str) -> int:
    """``shift`` if it is whole pixels in [0, ``max_shift``] (not a bool); otherwise a ValueError naming ``name``."""
    if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift <= max_shift(resolution):
        raise ValueError(f"{name} must be whole pixels in [0, {max_shift(resolution)}], got {shift!r}")
    return shift


def bundle_shift(metadata: Mapping[str, Any], resolution: int) -> int:
    """The shift in pixels a bundle's embeddings were calibrated with; 0 (the aligned crop only) if none."""
    return check_shift((metadata.get("views") or {}).get("shift", 0), resolution, "views.shift")


def version_suffix(shift: int) -> str:
    """What a shift adds to the model version: embeddings made with other views are not comparable."""
    return f"-tv{shift}" if shift else ""


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(N, C, H, W) normalised crops with their content moved ``dx`` pixels right and ``dy`` down. The uncovered
    edge is 0, mid-grey after ``crops_to_tensor``: the fill the training views use."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def view_count(shift: int) -> int:
    """How many views ``tta_views`` makes of each crop (before the mirror)."""
    return 1 + len(DIRECTIONS) if shift > 0 else 1


def tta_views(x: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """The views averaged for one batch: the crops themselves, then (``shift`` > 0) the four shifted copies."""
    if shift <= 0:
        return [x]
    return [x, *(shifted(x, dx * shift, dy * shift) for dx, dy in DIRECTIONS)]
