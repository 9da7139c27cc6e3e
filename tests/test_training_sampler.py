"""training.sampler.PKSampler: P identities x K images per batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.sampler import PKSampler


def labels_with_sizes(sizes: list[int]) -> np.ndarray:
    """Identity i gets sizes[i] images; the indices are shuffled so a batch is not a contiguous slice."""
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return np.random.default_rng(42).permutation(labels)


def test_batches_are_p_identities_times_k_images():
    labels = labels_with_sizes([5, 6, 7, 8, 4, 9, 5, 6])
    sampler = PKSampler(labels, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        assert batch.shape == (12,)
        blocks = labels[batch].reshape(4, 3)
        assert (blocks == blocks[:, :1]).all()  # K consecutive images of one identity
        assert len(set(blocks[:, 0])) == 4  # P different identities
        # every identity here has >= K images: drawn without replacement
        assert len(set(batch.tolist())) == 12


def test_every_identity_exactly_once_per_epoch_when_p_divides_them():
    labels = labels_with_sizes([3] * 12)
    sampler = PKSampler(labels, p=4, k=2, seed=0)
    orders = []
    for _ in range(3):
        seen = [int(labels[b[0]]) for batch in sampler for b in batch.reshape(4, 2)]
        assert sorted(seen) == list(range(12))
        orders.append(seen)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # a new random order each epoch


def test_identities_are_never_repeated_within_an_epoch_when_p_does_not_divide_them():
    labels = labels_with_sizes([3] * 10)
    sampler = PKSampler(labels, p=4, k=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    seen = Counter(int(labels[b[0]]) for batch in batches for b in batch.reshape(4, 2))
    assert max(seen.values()) == 1 and len(seen) == 8  # the 10 % 4 = 2 left over wait for the next epoch


def test_replacement_only_for_identities_with_fewer_than_k_images():
    labels = labels_with_sizes([1, 2, 4, 4])
    sampler = PKSampler(labels, p=4, k=4, seed=3)
    (batch,) = list(sampler)
    for block in batch.reshape(4, 4):
        ident = int(labels[block[0]])
        assert (labels[block] == ident).all()
        members = set(np.nonzero(labels == ident)[0].tolist())
        assert set(block.tolist()) <= members
        if len(members) >= 4:
            assert len(set(block.tolist())) == 4  # no repeats when there are enough images
    singleton = int(np.nonzero(labels == 0)[0][0])
    assert (batch == singleton).sum() == 4  # a one-image identity still fills its K slots


def test_same_seed_same_batches():
    labels = labels_with_sizes([4] * 8)
    a = [b.tolist() for b in PKSampler(labels, 4, 2, seed=7)]
    b = [b.tolist() for b in PKSampler(labels, 4, 2, seed=7)]
    c = [b.tolist() for b in PKSampler(labels, 4, 2, seed=8)]
    assert a == b and a != c


def test_errors():
    labels = labels_with_sizes([3, 3, 3])
    with pytest.raises(ValueError, match="only 3: lower the setting p"):
        PKSampler(labels, p=4, k=2)
    with pytest.raises(ValueError):
        PKSampler(labels, p=1, k=2)
    with pytest.raises(ValueError):
        PKSampler(labels, p=2, k=0)
