"""Aligned uint8 crops -> the network's input tensor; the one normalisation used in training and serving."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

MEAN, STD = 127.5, 128.0


def as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of ``images`` as they are (no copy unless needed). Arrays may be read-only views (aligned crops,
    memory-mapped caches), and torch needs writable, contiguous memory: those are copied."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(np.require(images, requirements=["C", "W"]))


def crops_to_tensor(crops: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, resolution, resolution) float in about [-1, 1]."""
    x = as_tensor(crops)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).float().sub_(MEAN).div_(STD)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()
