"""P x K batches: P identities, K images each, so every batch holds positives and negatives to mine."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


class PKSampler:
    """Yields index batches of P identities x K images.

    Each epoch visits identities in a new random order, each at most once (the last ``len % P`` of the order
    are left for the next epoch's shuffle). Identities with fewer than K images are drawn with
    replacement (augmentation makes the repeats different views), so singletons still get distilled and serve as
    negatives for everyone else.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0) -> None:
        if p < 2 or k < 1:
            raise ValueError(f"need P >= 2 identities and K >= 1 images per batch, got P={p}, K={k}")
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            by_label[int(label)].append(i)
        if len(by_label) < p:
            raise ValueError(f"P={p} identities per batch but the data has only {len(by_label)}: lower the setting "
                             f"p (p={len(by_label)} or less)")
        self.groups = [np.asarray(v) for _, v in sorted(by_label.items())]
        self.p, self.k = p, k
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups) // self.p

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(len(self.groups))
        for start in range(0, len(order) - self.p + 1, self.p):
            batch = []
            for g in order[start : start + self.p]:
                members = self.groups[g]
                batch.append(self.rng.choice(members, self.k, replace=len(members) < self.k))
            yield np.concatenate(batch)
