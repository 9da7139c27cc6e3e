"""training.miners on embeddings placed by hand, where the right triplets are known; and brute force."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from torch.nn import functional as F

from training.miners import MINERS, batch_all, batch_hard, pairwise_distances, semi_hard


def on_circle(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: the distance between two is 2 sin(angle between / 2)."""
    rad = torch.tensor([math.radians(d) for d in degrees], dtype=torch.float64)
    return torch.stack([torch.cos(rad), torch.sin(rad)], 1).float()


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


def triplet_set(triplets) -> set[tuple[int, int, int]]:
    a, p, n = (t.tolist() for t in triplets)
    return set(zip(a, p, n, strict=True))


def random_batch(
    seed: int, n: int = 24, identities: int = 6, dim: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, identities, (n,), generator=gen)
    centres = F.normalize(torch.randn(identities, dim, generator=gen), dim=1)
    emb = F.normalize(centres[labels] + 0.6 * torch.randn(n, dim, generator=gen), dim=1)
    return emb, labels


def test_pairwise_distances_of_unit_vectors():
    emb = on_circle([0, 60, 90, 180])
    d = pairwise_distances(emb)
    expected = torch.tensor([[chord(abs(a - b)) for b in (0, 60, 90, 180)] for a in (0, 60, 90, 180)])
    assert torch.allclose(d, expected, atol=1e-5)
    assert torch.allclose(d, torch.cdist(emb, emb), atol=1e-5)


# Class 0 at 0, 20, 50 degrees; class 1 at 90, 110, 200 degrees. Angles between (smaller is nearer):
#   0: 20(1) 50(2) | 90(3) 110(4) 160(5)        3: 20(4) 110(5) | 90(0) 70(1) 40(2)
#   1: 20(0) 30(2) | 70(3)  90(4) 180(5)        4: 20(3)  90(5) | 110(0) 90(1) 60(2)
#   2: 50(0) 30(1) | 40(3)  60(4) 150(5)        5: 110(3) 90(4) | 160(0) 180(1) 150(2)
HAND_ANGLES = [0, 20, 50, 90, 110, 200]
HAND_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def hand_angle(i: int, j: int) -> float:
    diff = abs(HAND_ANGLES[i] - HAND_ANGLES[j])
    return min(diff, 360 - diff)


def test_batch_hard_picks_the_farthest_positive_and_the_nearest_negative():
    a, p, n = batch_hard(on_circle(HAND_ANGLES), HAND_LABELS)
    assert a.tolist() == [0, 1, 2, 3, 4, 5]
    assert p.tolist() == [2, 2, 0, 5, 5, 3]
    assert n.tolist() == [3, 3, 3, 2, 2, 2]


def test_batch_hard_skips_anchors_without_a_positive():
    emb = on_circle([0, 30, 100, 200])
    a, p, n = batch_hard(emb, torch.tensor([0, 0, 1, 2]))  # identities 1 and 2 have one image each
    assert a.tolist() == [0, 1] and p.tolist() == [1, 0] and n.tolist() == [2, 2]
    a, _, _ = batch_hard(emb, torch.tensor([0, 0, 0, 0]))  # nobody has a negative
    assert len(a) == 0


def test_batch_all_on_three_points():
    # d(0,1) = 1.0 (60 degrees), d(0,2) = d(1,2) = 0.518 (30 degrees): the negative sits between the positives
    a, p, n = batch_all(on_circle([0, 60, 30]), torch.tensor([0, 0, 1]), margin=0.2)
    assert triplet_set((a, p, n)) == {(0, 1, 2), (1, 0, 2)}
    # a far negative (180 degrees) violates no margin: nothing to learn
    a, _, _ = batch_all(on_circle([0, 10, 180]), torch.tensor([0, 0, 1]), margin=0.2)
    assert len(a) == 0


def test_batch_all_on_the_hand_placed_batch():
    emb, margin = on_circle(HAND_ANGLES), 0.2
    got = triplet_set(batch_all(emb, HAND_LABELS, margin))
    expected = {
        (i, j, k)
        for i, j, k in product(range(6), repeat=3)
        if i != j
        and HAND_LABELS[i] == HAND_LABELS[j]
        and HAND_LABELS[k] != HAND_LABELS[i]
        and chord(hand_angle(i, j)) - chord(hand_angle(i, k)) + margin > 0
    }
    assert got == expected
    assert (2, 0, 3) in got  # positive 50 degrees away, negative 40: violates outright
    assert (0, 2, 3) not in got and (0, 1, 5) not in got  # 50 vs 90, 20 vs 160 degrees: beyond the margin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_equals_a_brute_force_loop(seed):
    emb, labels = random_batch(seed)
    margin = 0.3
    d = torch.cdist(emb.double(), emb.double())
    n = len(labels)
    expected = {
        (i, j, k)
        for i, j, k in product(range(n), repeat=3)
        if i != j and labels[i] == labels[j] and labels[k] != labels[i] and d[i, j] - d[i, k] + margin > 0
    }
    got = triplet_set(batch_all(emb, labels, margin))
    assert len(expected) > 50
    assert got == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_equals_a_brute_force_loop(seed):
    emb, labels = random_batch(seed)
    d = torch.cdist(emb.double(), emb.double())
    got = {a: (p, n) for a, p, n in triplet_set(batch_hard(emb, labels))}
    n = len(labels)
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(n) if labels[k] != labels[i]]
        if not pos:
            assert i not in got
            continue
        p, q = got[i]
        assert d[i, p] == max(d[i, j] for j in pos)
        assert d[i, q] == min(d[i, k] for k in neg)


def semi_hard_choice(degrees: list[float], labels: list[int], margin: float = 0.2) -> int:
    """The negative semi_hard picks for the pair (anchor 0, positive 1)."""
    a, p, n = semi_hard(on_circle(degrees), torch.tensor(labels), margin)
    rows = [k for k in range(len(a)) if (a[k].item(), p[k].item()) == (0, 1)]
    assert len(rows) == 1
    return n[rows[0]].item()


def test_semi_hard_picks_the_nearest_negative_inside_the_margin_band():
    # anchor 0 deg, positive 20 deg: d(a,p) = 0.347; the band is (0.347, 0.547)
    # negatives: 10 deg (0.174, hard), 25 deg (0.433, semi-hard), 28 deg (0.484, semi-hard),
    # 60 deg (1.0, easy)
    assert semi_hard_choice([0, 20, 10, 28, 25, 60], [0, 0, 1, 1, 1, 1]) == 4


def test_semi_hard_falls_back_to_the_nearest_negative_beyond_the_positive():
    # nothing in (0.347, 0.547): negatives at 10 deg (hard), 60 deg (1.0) and 90 deg (1.41) -> the 60 deg one
    assert semi_hard_choice([0, 20, 10, 90, 60], [0, 0, 1, 1, 1]) == 4


def test_semi_hard_falls_back_to_the_farthest_negative_when_all_are_harder():
    # positive at 90 deg (1.41); every negative is nearer (10, 45, 30 deg) -> the farthest of them, 45 deg
    assert semi_hard_choice([0, 90, 10, 45, 30], [0, 0, 1, 1, 1]) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_equals_a_brute_force_loop(seed):
    emb, labels = random_batch(seed)
    margin = 0.2
    d = torch.cdist(emb.double(), emb.double())
    a, p, n = semi_hard(emb, labels, margin)
    n_items = len(labels)
    expected_pairs = {
        (i, j) for i in range(n_items) for j in range(n_items) if i != j and labels[i] == labels[j]
    }
    assert set(zip(a.tolist(), p.tolist(), strict=True)) == expected_pairs  # one triplet per positive pair
    assert len(a) == len(expected_pairs)
    kinds = set()
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert labels[k] != labels[i]
        neg = [m for m in range(n_items) if labels[m] != labels[i]]
        band = [m for m in neg if d[i, j] < d[i, m] < d[i, j] + margin]
        farther = [m for m in neg if d[i, m] > d[i, j]]
        if band:
            kinds.add("semi")
            assert d[i, k] == min(d[i, m] for m in band)
        elif farther:
            kinds.add("farther")
            assert d[i, k] == min(d[i, m] for m in farther)
        else:
            kinds.add("hardest")
            assert d[i, k] == max(d[i, m] for m in neg)
    assert "semi" in kinds and len(kinds) >= 2  # the batch exercised the fallback too


def test_miners_do_not_track_gradients_and_are_registered():
    emb, labels = random_batch(0)
    emb.requires_grad_(True)
    for name, miner in MINERS.items():
        out = miner(emb, labels, 0.2)
        assert all(not t.requires_grad and t.dtype == torch.int64 for t in out), name
    assert set(MINERS) == {"batch_all", "batch_hard", "semi_hard"}


@pytest.mark.parametrize("name", sorted(MINERS))
def test_miners_return_no_triplets_for_an_empty_or_single_sample_batch(name):
    """With blends kept out of the triplet term, a small batch can leave no unblended sample at all."""
    for n in (0, 1):
        emb = F.normalize(torch.randn(n, 8), dim=1)
        a, p, neg = MINERS[name](emb, torch.arange(n), 0.2)
        assert len(a) == len(p) == len(neg) == 0
