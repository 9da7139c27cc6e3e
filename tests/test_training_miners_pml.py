"""training.miners cross-checked against pytorch-metric-learning's miners (the reference implementation).

Needs the dev dependency ``pytorch-metric-learning`` (it installs against the project's torch and pulls
nothing else).
"""

from __future__ import annotations

import pytest
from pytorch_metric_learning import miners as pml_miners
from test_training_miners import random_batch, triplet_set

from training.miners import batch_all, batch_hard, pairwise_distances, semi_hard


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_hard_matches_pytorch_metric_learning(seed):
    emb, labels = random_batch(seed, n=32, identities=8, dim=8)
    ours = triplet_set(batch_hard(emb, labels))
    theirs = triplet_set(pml_miners.BatchHardMiner()(emb, labels))
    assert ours == theirs and len(ours) > 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_all_matches_pytorch_metric_learning(seed):
    emb, labels = random_batch(seed, n=32, identities=8, dim=8)
    ours = triplet_set(batch_all(emb, labels, 0.2))
    theirs = triplet_set(pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")(emb, labels))
    assert ours == theirs and len(ours) > 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_semi_hard_choice_is_the_nearest_of_pytorch_metric_learnings_semihard_set(seed):
    """PML returns every semi-hard triplet; ours keeps, per positive pair, the nearest of them."""
    emb, labels = random_batch(seed, n=32, identities=8, dim=8)
    margin = 0.2
    theirs: dict[tuple[int, int], set[int]] = {}
    for a, p, n in triplet_set(
        pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")(emb, labels)
    ):
        theirs.setdefault((a, p), set()).add(n)
    assert theirs
    d = pairwise_distances(emb)
    ours = {(a, p): n for a, p, n in triplet_set(semi_hard(emb, labels, margin))}
    for pair, negatives in theirs.items():
        assert ours[pair] in negatives
        assert d[pair[0], ours[pair]] == min(d[pair[0], m] for m in negatives)
