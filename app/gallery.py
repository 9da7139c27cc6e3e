"""The gallery: the SQLite store (truth) and the FAISS index (cache) kept in agreement, and subject search.

The index only ever holds faces embedded by the current model version. It is brought up to date from the
store's change log before every search (``sync``), so faces enrolled or deleted by another process (``visage
enroll``, another uvicorn worker) are seen without a restart, and at start-up it is loaded only if it agrees
with the store (same generation after replaying the log, same ids), otherwise rebuilt from the store.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import NoCurrentFaces, StorageUnavailable
from app.index import FaceIndex, IndexConfig, IndexFileError, IndexFileMissing, ids_checksum
from app.store import Store, SubjectRef
from model.score_norm import CohortNorm

log = logging.getLogger("visage.gallery")
_AGREEMENT_RETRIES = 5


@dataclass(frozen=True)
class SubjectHit:
    """One subject's best face for a probe: subjects are ranked by their most similar face."""

    subject_id: int
    name: str
    similarity: float
    face_id: int


class Gallery:
    """Store + index for one model version. Thread-safe; any number of processes may share the files."""

    def __init__(
        self,
        store: Store,
        index_path: Path | None,
        model_version: str,
        dim: int,
        config: IndexConfig | None = None,
        scorer: CohortNorm | None = None,
    ) -> None:
        self.store, self.index_path = store, index_path
        self.model_version, self.dim = model_version, dim
        # scores are the weights' own (model.score_norm): the index holds each face's vector plus one column
        # for its cohort offset, so an inner-product search ranks by the normalised score exactly
        self.scorer = scorer or CohortNorm.plain(dim)
        self.index_dim = dim + 1
        self.index_version = f"{model_version}|{self.scorer.tag}"
        self.config = config or IndexConfig()
        self.index: FaceIndex | None = None
        self.opened_by = "not opened"
        self._lock = threading.RLock()

    # -- opening, rebuilding, saving -------------------------------------------------------------------------

    def open(self) -> str:
        """Load the saved index if it agrees with the store, else rebuild it; returns what happened."""
        with self._lock:
            try:
                index = self._load()
                self.index = index
                before = index.generation
                self._catch_up()
                self._check_agreement()
                if self.index is not index:  # replaying the log needed a rebuild (HNSW replaced a vector)
                    self._save_cache()
                elif index.needs_rebuild:
                    raise IndexFileError("the index is due for a rebuild (tombstones or IVF training)")
                elif index.generation > before:
                    self.opened_by = f"loaded, replayed changes {before + 1}..{index.generation}"
                    self._save_cache()
                else:
                    self.opened_by = "loaded"
            except IndexFileMissing as exc:  # the first start, not a problem: "built", not "rebuilt"
                self.rebuild(str(exc), first=True)
                self._save_cache()
            except IndexFileError as exc:
                self.rebuild(str(exc))
                self._save_cache()
            log.info(
                "index %s: %s (%d faces, %s)",
                self.config.kind,
                self.opened_by,
                len(self.index),
                self.model_version,
            )
            return self.opened_by

    def _load(self) -> FaceIndex:
        if self.index_path is None:
            raise IndexFileError("no index file configured")
        index = FaceIndex.load(self.index_path, self.config)
        if index.model_version != self.index_version or index.dim != self.index_dim:
            raise IndexFileError(
                f"index file holds {index.model_version} ({index.dim}-d) vectors, not {self.index_version}"
            )
        if index.store_id != self.store.store_id:
            raise IndexFileError("index file was built from another database (restored from a backup?)")
        if index.generation > self.store.generation():
            raise IndexFileError("index file is ahead of the store (was the database replaced?)")
        if index.change_token != self.store.change_token(index.generation):  # same ids, maybe other vectors
            raise IndexFileError("index file was saved from another history of this database (a copy of it put "
                                 "back, then written to?)")
        return index

    def _check_agreement(self) -> None:
        """Same ids in index and store at the same generation, else ``IndexFileError``."""
        assert self.index is not None
        for _ in range(_AGREEMENT_RETRIES):
            generation, ids = self.store.current_ids(self.model_version, self.dim)
            if generation != self.index.generation:  # another process wrote meanwhile: catch up, look again
                self._catch_up()
                continue
            if len(ids) != len(self.index) or ids_checksum(ids) != self.index.checksum():
                raise IndexFileError(
                    f"index disagrees with the store ({len(self.index)} faces indexed, "
                    f"{len(ids)} in the store at generation {generation})"
                )
            return
        raise IndexFileError("the store kept changing while the index was checked")

    def rebuild(self, reason: str, first: bool = False) -> None:
        """A fresh index from every current-version face in the store. ``first``: there was no index to replace
        (no index file), so it is "built", and "built (new gallery)" when the store has never held a face."""
        with self._lock:
            snap = self.store.snapshot(self.model_version, self.dim)
            self.index = FaceIndex.build(
                self.index_dim,
                self.config,
                self.index_version,
                snap.ids,
                self.scorer.gallery_vectors(snap.vectors.reshape(-1, self.dim)),
                snap.generation,
            )
            self.index.store_id = self.store.store_id
            verb = "built" if first else "rebuilt"
            if first and snap.generation == 0:
                reason = "new gallery"
            self.opened_by = f"{verb} ({reason})"
            log.info("index %s from the store: %s; %d faces", verb, reason, len(snap.ids))

    def save(self) -> None:
        with self._lock:
            if self.index is not None and self.index_path is not None:
                self.index.change_token = self.store.change_token(self.index.generation)
                self.index.save(self.index_path)

    def _save_cache(self) -> None:
        """``save``, where a failure (disk full, a read-only folder) is logged, not raised: the index is a cache
        of the store, and one that cannot be written is still right in memory. Raised, it kept a service whose
        store was fine from ever becoming ready (at start-up) or failed its shutdown."""
        try:
            self.save()
        except (OSError, StorageUnavailable) as exc:
            log.warning("index not saved (%s): the next start replays or rebuilds it from the store", exc)

    def close(self) -> None:
        """Save the index and close the store; a catch-up that fails is logged too (it would only fail the
        shutdown)."""
        try:
            try:
                self.sync()
            except StorageUnavailable as exc:  # saved as it is: consistent with its own generation
                log.warning("index not brought up to date (%s): the next start replays the rest", exc)
            self._save_cache()
        finally:
            self.store.close()

    # -- keeping up with the store ---------------------------------------------------------------------------

    def sync(self) -> None:
        """Apply every store change since the index's generation (from this process or any other)."""
        if self.index is None:
            return  # a writer-only gallery (batch enrollment, reindex): the service's index catches up itself
        with self._lock:
            self._catch_up()
            if self.index.needs_rebuild:
                self.rebuild("tombstones or IVF training")

    def _catch_up(self) -> None:
        assert self.index is not None
        generation = self.store.generation()
        if generation == self.index.generation:
            return
        if generation < self.index.generation:
            self.rebuild("the store's change log went backwards")
            return
        changes = self.store.changes_since(self.index.generation, self.model_version, self.dim)
        self.index.remove(changes.removed)
        vectors = self.scorer.gallery_vectors(np.asarray(changes.vectors).reshape(-1, self.dim))
        if not self.index.upsert(changes.ids, vectors):
            self.rebuild("a changed face cannot be replaced in place")
            return
        self.index.generation = changes.generation

    # -- searching -------------------------------------------------------------------------------------------

    def identify(self, vectors: np.ndarray, k: int) -> list[list[SubjectHit]]:
        """For each probe vector, the ``k`` most similar subjects (max score over each subject's faces)."""
        self.sync()
        return [self._rank_subjects(np.asarray(v, dtype=np.float32), k) for v in np.atleast_2d(vectors)]

    def _rank_subjects(self, vector: np.ndarray, k: int) -> list[SubjectHit]:
        assert self.index is not None
        query, shift = self.scorer.query_vectors(vector)
        want = max(4 * k, 32)
        while True:
            with self._lock:
                total = len(self.index)
                sims, ids = self.index.search(query, min(want, total))
            sims = sims + shift[:, None]
            owners = self.store.face_subjects([int(i) for i in ids[0] if i >= 0])
            best: dict[int, SubjectHit] = {}
            for sim, face_id in zip(sims[0], ids[0], strict=True):
                owner = owners.get(int(face_id))  # None: deleted since the search
                if owner is not None and owner[0] not in best:
                    best[owner[0]] = SubjectHit(owner[0], owner[1], float(sim), int(face_id))
            if len(best) >= k or want >= total:
                return list(best.values())[:k]
            want *= 4  # one subject's many faces crowded the others out: look further

    def best_match(self, subject_id: int, vector: np.ndarray) -> tuple[float, int]:
        """(score, face id) of the subject's face scoring highest against ``vector``; exact, from the store."""
        ids, matrix = self.store.subject_embeddings(subject_id, self.model_version, self.dim)
        if not len(ids):
            subject = self.store.subject(SubjectRef(id=subject_id))
            why = (
                f"its {subject.face_count} face(s) were embedded by another model version; run `visage reindex`"
                if subject.face_count
                else "it has no faces"
            )
            raise NoCurrentFaces(f"subject {subject_id} cannot be verified: {why}")
        sims = self.scorer.matrix(np.asarray(vector, dtype=np.float32), matrix)[0]
        best = int(np.argmax(sims))
        return float(sims[best]), int(ids[best])

    # -- reporting -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int | str]:
        """Store counts and the index size, after catching up with the store."""
        self.sync()
        counts = self.store.counts(self.model_version)
        with self._lock:
            indexed = len(self.index) if self.index is not None else 0
        return {**counts, "indexed_faces": indexed, "index_kind": self.config.kind}

    def agreement(self) -> dict[str, object]:
        """Whether index and store hold the same current-version faces (after a sync): for checks and
        tests."""
        self.sync()
        with self._lock:
            assert self.index is not None
            generation, ids = self.store.current_ids(self.model_version, self.dim)
            indexed = self.index.ids()
            return {
                "agree": bool(np.array_equal(ids, indexed)),
                "store_faces": len(ids),
                "indexed_faces": len(indexed),
                "generation": generation,
                "index_generation": self.index.generation,
            }
