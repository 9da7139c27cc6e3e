"""Online triplet miners: embeddings + labels -> (anchor, positive, negative) index tensors.

Miners only choose triplets; losses (``training.losses``) only score them, as in pytorch-metric-learning, so
any miner composes with any loss. Distances are Euclidean between L2-normalised embeddings.
"""

from __future__ import annotations

import torch

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix; for unit vectors d^2 = 2 - 2 cos, clamped to stay differentiable at 0."""
    sq = (2.0 - 2.0 * emb @ emb.T).clamp_min(0.0)
    return torch.sqrt(sq + 1e-12)


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive pairs (not self), negative pairs


def _no_triplets(labels: torch.Tensor) -> Triplets:
    """An empty batch (every sample blended, say) has no triplets; argmax over nothing would raise."""
    none = labels.new_zeros(0, dtype=torch.long)
    return none, none, none


def _all_valid(labels: torch.Tensor) -> torch.Tensor:
    """(a, p, n) boolean cube of every valid triplet."""
    pos, neg = _masks(labels)
    return pos[:, :, None] & neg[:, None, :]


def batch_all(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> Triplets:
    """Every valid triplet that still violates the margin (``d(a,p) - d(a,n) + margin > 0``)."""
    with torch.no_grad():
        d = pairwise_distances(emb)
        active = _all_valid(labels) & (d[:, :, None] - d[:, None, :] + margin > 0)
        a, p, n = torch.nonzero(active, as_tuple=True)
    return a, p, n


def batch_hard(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> Triplets:
    """For each anchor: its farthest positive and nearest negative (Hermans et al. 2017)."""
    if len(labels) == 0:
        return _no_triplets(labels)
    with torch.no_grad():
        d = pairwise_distances(emb)
        pos, neg = _masks(labels)
        has = pos.any(1) & neg.any(1)
        hardest_p = torch.where(pos, d, torch.full_like(d, -1.0)).argmax(1)
        hardest_n = torch.where(neg, d, torch.full_like(d, float("inf"))).argmin(1)
        a = torch.nonzero(has, as_tuple=True)[0]
    return a, hardest_p[a], hardest_n[a]


def semi_hard(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> Triplets:
    """FaceNet's semi-hard negatives: for each (anchor, positive), the nearest negative farther than the
    positive but inside the margin; where none exists, the hardest negative farther than the positive
    (else the farthest negative overall), so every positive pair keeps a triplet."""
    if len(labels) == 0:
        return _no_triplets(labels)
    with torch.no_grad():
        d = pairwise_distances(emb)
        pos, neg = _masks(labels)
        a, p = torch.nonzero(pos & neg.any(1, keepdim=True), as_tuple=True)
        d_ap = d[a, p][:, None]
        d_an = d[a]  # (T, B)
        negs = neg[a]
        inf = torch.full_like(d_an, float("inf"))
        semi = negs & (d_an > d_ap) & (d_an < d_ap + margin)
        farther = negs & (d_an > d_ap)
        n_semi = torch.where(semi, d_an, inf).argmin(1)
        n_farther = torch.where(farther, d_an, inf).argmin(1)
        n_any = torch.where(negs, d_an, torch.full_like(d_an, -1.0)).argmax(1)
        n = torch.where(semi.any(1), n_semi, torch.where(farther.any(1), n_farther, n_any))
    return a, p, n


MINERS = {"batch_all": batch_all, "batch_hard": batch_hard, "semi_hard": semi_hard}
