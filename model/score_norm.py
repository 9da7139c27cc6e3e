"""How two embeddings are scored: the cosine minus each face's mean cosine to its nearest faces in a cohort.

Some faces sit close to many strangers ("hubs"); under a plain cosine they cause most of the false accepts at
strict thresholds. Subtracting half of each face's mean cosine to its ``k`` most similar faces in a fixed cohort
of training faces (CSLS, Conneau et al. 2018; the mean-only form of adaptive score normalisation) removes that
bias. On held-out LFW people it doubled the genuine pairs accepted at FAR 1e-3 (docs/TRAINING.md, "Scoring").

The cohort belongs to the weights (their embeddings of training faces), so it travels in the bundle. A bundle
without one scores by plain cosine: every offset is 0.

Offsets are capped (``cap``, set at calibration): a photo compared with itself scores ``1 - offset``, and without a
cap the strongest hubs (offsets up to 0.94 among training faces) would fail to match their own photo at FAR 1e-4.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

CHUNK = 2048  # rows of similarities at a time: a gallery rebuild of 1M faces must not hold 1M x 4,096 floats


@dataclass(frozen=True, eq=False)
class CohortNorm:
    """``score(a, b) = a.b - (offset(a) + offset(b)) / 2``; ``offset(x)`` = mean of x's top-``k`` cohort cosines."""

    cohort: np.ndarray  # (n, dim) float32 unit vectors; n = 0 means plain cosine
    k: int = 16
    cap: float = 1.0  # no offset exceeds it, so a face always scores >= 1 - cap against an identical copy

    def __post_init__(self) -> None:
        if self.cohort.ndim != 2:
            raise ValueError(f"cohort must be (n, dim), got shape {self.cohort.shape}")
        if len(self.cohort) and not 1 <= self.k <= len(self.cohort):
            raise ValueError(f"k={self.k} must be between 1 and the cohort size {len(self.cohort)}")
        if not 0.0 < self.cap <= 1.0:
            raise ValueError(f"the offset cap must be in (0, 1], got {self.cap}")

    @classmethod
    def plain(cls, dim: int) -> CohortNorm:
        """Plain cosine scoring (no cohort)."""
        return cls(np.zeros((0, dim), dtype=np.float32), k=0)

    @property
    def enabled(self) -> bool:
        return len(self.cohort) > 0

    @cached_property
    def tag(self) -> str:
        """Names the scoring rule: an index built with one cohort's offsets is stale under another."""
        if not self.enabled:
            return "cosine"
        capped = f"c{self.cap:g}" if self.cap < 1.0 else ""
        return f"cohort{len(self.cohort)}k{self.k}{capped}-{hashlib.sha256(self.cohort.tobytes()).hexdigest()[:10]}"

    def offsets(self, vectors: np.ndarray) -> np.ndarray:
        """(N, dim) unit vectors -> (N,) mean cosine to each one's ``k`` most similar cohort faces."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        out = np.zeros(len(vectors), dtype=np.float32)
        if not self.enabled:
            return out
        for start in range(0, len(vectors), CHUNK):
            sims = vectors[start : start + CHUNK] @ self.cohort.T
            sims.partition(len(self.cohort) - self.k, axis=1)  # in place: the k largest end up last
            out[start : start + CHUNK] = sims[:, -self.k :].mean(axis=1)
        return np.minimum(out, self.cap)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Scores of the row pairs (a[i], b[i])."""
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        return np.sum(a * b, axis=1) - 0.5 * (self.offsets(a) + self.offsets(b))

    def matrix(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(Na, Nb) scores of every a against every b (``matrix(x, x)`` computes x's offsets once)."""
        same = b is a
        a = np.atleast_2d(a)
        b = a if same else np.atleast_2d(b)
        offset_a = self.offsets(a)
        offset_b = offset_a if same else self.offsets(b)
        return a @ b.T - 0.5 * (offset_a[:, None] + offset_b[None, :])

    def score(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.pairs(a, b)[0])

    # An inner-product index gives exact normalised scores with one extra column: the gallery side carries
    # -offset/2, the query side a 1, and the query's own -offset/2 is added to every result.
    def gallery_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return np.hstack([vectors, -0.5 * self.offsets(vectors)[:, None]]).astype(np.float32)

    def query_vectors(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index queries, what to add to each query's results)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        ones = np.ones((len(vectors), 1), dtype=np.float32)
        return np.hstack([vectors, ones]), -0.5 * self.offsets(vectors)

    # -- the bundle's payload: tensors only, so bundles still load with torch's weights_only unpickler ----------
    def to_payload(self) -> dict[str, object]:
        return {"method": "cohort-mean", "k": self.k, "cap": self.cap,
                "cohort": torch.from_numpy(self.cohort).to(torch.float16)}

    @classmethod
    def from_payload(cls, payload: dict[str, object] | None, dim: int) -> CohortNorm:
        if not payload:
            return cls.plain(dim)
        if not isinstance(payload, dict) or payload.get("method") != "cohort-mean":
            raise ValueError(f"unknown score normalisation {payload!r:.80}")
        cohort = payload["cohort"]
        if not isinstance(cohort, torch.Tensor) or cohort.ndim != 2 or cohort.shape[1] != dim:
            raise ValueError(f"the score cohort must be an (n, {dim}) tensor")
        return cls(cohort.float().numpy(), int(payload["k"]), float(payload.get("cap", 1.0)))  # type: ignore[arg-type]


def cohort_from(embeddings: np.ndarray, k: int = 16) -> CohortNorm:
    """A cohort of these faces' embeddings (training faces, never the people it will be judged on)."""
    # stored as float16 in the bundle: round here so a fresh and a reloaded cohort score identically
    cohort = np.asarray(embeddings, dtype=np.float32).astype(np.float16).astype(np.float32)
    return CohortNorm(cohort, min(k, len(cohort)))
