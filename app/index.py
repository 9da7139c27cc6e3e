"""The FAISS cache of the store: the score as an inner product (``app.gallery`` builds the vectors), keyed by face id.

``flat`` (exact, ``IndexIDMap2(IndexFlatIP)``) is the default and removes faces in place. ``ivf`` (IVFFlat
with native ids) removes in place too, and is trained on the gallery when the index is built. ``hnsw`` cannot
remove vectors, so removed faces become *tombstones*: they are filtered out of every search, and the index is
rebuilt from the store once they exceed a fifth of it, or when a removed face comes back with a new vector
(reindex).

The file written by ``save`` carries the store generation it reflects, the id of the database it was built
from and the token of that generation's change (another history of the same database: a copy put back, then
written to), the live id count, a checksum of the ids and one of the FAISS bytes (a damaged vector would
otherwise be served as it is), so start-up can tell a current cache from a stale, foreign or damaged one
(``app.gallery`` decides what to do).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.files import private_dir, remove_stale
from app.settings import IndexType

MAGIC = b"VISAGEIX"
FORMAT = 2  # 2: payload checksum and change token (a format-1 file is rebuilt once)
TOMBSTONE_REBUILD_FRACTION = 0.2
IVF_MIN_PER_LIST = 39  # FAISS warns below ~39 training points per centroid


def set_faiss_threads(threads: int) -> None:
    """FAISS's OpenMP thread count for this process (0 leaves FAISS's default). The service searches one query
    at a time, from several request threads: one OpenMP thread per search avoids the fork/join cost and the
    oversubscription of 2 cores, at the price of slower index (re)builds."""
    if threads > 0:
        faiss.omp_set_num_threads(threads)


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexType = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 1024
    # recall@1 0.992 vs the exact (cohort-normalised) score at 1M synthetic faces, 8.9 ms on 1 FAISS thread
    # (docs/BENCHMARKS.md section 4); 256 was enough for plain cosine (0.995) but gives 0.988 with the cohort column
    ivf_nprobe: int = 320


class IndexFileError(Exception):
    """The index file is missing, unreadable or does not describe this model (the caller rebuilds)."""


class IndexFileMissing(IndexFileError):
    """No index file at all: a new gallery, or none saved yet (the caller builds one; nothing is wrong)."""


def ids_checksum(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def remove_leftovers(path: Path) -> list[Path]:
    """The temp files of saves that a kill interrupted (``FaceIndex.save`` writes ``.NAME.*.tmp`` beside ``path``)."""
    return remove_stale(path.parent, f".{path.name}.*.tmp") if path.parent.is_dir() else []


class FaceIndex:
    """An in-memory FAISS index over (face id, vector), plus the store generation it is current at.

    Not thread-safe on its own: ``app.gallery.Gallery`` serialises access with its lock.
    """

    def __init__(self, dim: int, config: IndexConfig, model_version: str) -> None:
        self.dim, self.config, self.model_version = dim, config, model_version
        self.generation = 0
        self.store_id = ""  # the database it was built from (``Store.store_id``)
        self.change_token: str | None = None  # ``Store.change_token(generation)``, set by the gallery on save
        self.trained_on = 0
        self.tombstones: set[int] = set()
        self._index = self._new_index(np.zeros((0, dim), dtype=np.float32))

    # -- construction ----------------------------------------------------------------------------------------

    def _new_index(self, train: np.ndarray) -> faiss.Index:
        cfg = self.config
        if cfg.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = cfg.hnsw_ef_search
            return faiss.IndexIDMap2(inner)
        if cfg.kind == "ivf":
            nlist = max(1, min(cfg.ivf_nlist, len(train) // IVF_MIN_PER_LIST))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if nlist == 1:  # one list (a gallery under 2 x 39 faces): exact, nothing to cluster, nothing to warn
                index.cp.min_points_per_centroid = 1  # (FAISS printed "WARNING clustering 1 points ..." to stderr)
            sample = train if len(train) >= nlist else np.eye(1, self.dim, dtype=np.float32)
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
            index.nprobe = min(cfg.ivf_nprobe, nlist)
            self.trained_on = len(train)
            return index
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @classmethod
    def build(
        cls,
        dim: int,
        config: IndexConfig,
        model_version: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        generation: int,
    ) -> FaceIndex:
        """A fresh index over these faces (IVF is trained on them)."""
        index = cls(dim, config, model_version)
        index._index = index._new_index(vectors)
        index._add(ids, vectors)
        index.generation = generation
        return index

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.kind

    def _all_ids(self) -> np.ndarray:
        if isinstance(self._index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        invlists = self._index.invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(self._index.nlist)
            if invlists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def ids(self) -> np.ndarray:
        """Sorted ids of the live faces (tombstones excluded)."""
        ids = self._all_ids()
        if self.tombstones:
            ids = ids[~np.isin(ids, np.fromiter(self.tombstones, dtype=np.int64))]
        return np.sort(ids)

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self.tombstones)

    def checksum(self) -> str:
        return ids_checksum(self.ids())

    @property
    def needs_rebuild(self) -> bool:
        """Too many HNSW tombstones (searches would waste effort), or an IVF trained on a much smaller
        gallery."""
        if len(self.tombstones) > max(64, TOMBSTONE_REBUILD_FRACTION * self._index.ntotal):
            return True
        return self.kind == "ivf" and len(self) > 4 * max(self.trained_on, 256)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (similarities, face ids) per query, best first; short rows are padded with id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        nq = len(queries)
        sims = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if k <= 0 or len(self) == 0:
            return sims, ids
        ask = min(int(self._index.ntotal), k + len(self.tombstones))
        found_sims, found_ids = self._index.search(queries, ask)
        dead = np.fromiter(self.tombstones, dtype=np.int64) if self.tombstones else None
        for row in range(nq):
            keep = found_ids[row] >= 0
            if dead is not None:
                keep &= ~np.isin(found_ids[row], dead)
            s, i = found_sims[row][keep][:k], found_ids[row][keep][:k]
            sims[row, : len(s)], ids[row, : len(i)] = s, i
        return sims, ids

    # -- writing ---------------------------------------------------------------------------------------------

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
            self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "hnsw":
            present = self._all_ids()
            self.tombstones.update(int(i) for i in ids[np.isin(ids, present)])
        else:
            self._index.remove_ids(np.ascontiguousarray(ids))

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> bool:
        """Add these faces, replacing any vector already held under the same id.

        Returns False (and changes nothing) when the index cannot replace in place (HNSW re-adding an id):
        the caller must rebuild.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return True
        if self.kind == "hnsw":
            if np.isin(ids, self._all_ids()).any():
                return False
        else:
            self.remove(ids)
        self._add(ids, vectors)
        return True

    # -- persistence -----------------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_version": self.model_version,
            "dim": self.dim,
            "kind": self.kind,
            "generation": self.generation,
            "store_id": self.store_id,
            "change_token": self.change_token,
            "count": len(self),
            "ids_sha256": self.checksum(),
            "tombstones": sorted(self.tombstones),
            "trained_on": self.trained_on,
        }

    def save(self, path: str | Path) -> None:
        """Write header + FAISS bytes to a temp file, fsync, rename: readers see the old file or the new
        one."""
        path = Path(path)
        private_dir(path.parent)
        remove_leftovers(path)
        payload = faiss.serialize_index(self._index)  # a uint8 array, hashed and written as it is (no copy)
        header = json.dumps({**self.header(), "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + struct.pack("<I", len(header)) + header)
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, config: IndexConfig) -> FaceIndex:
        """Read a saved index; raises ``IndexFileError`` when the file is absent, damaged or inconsistent."""
        path = Path(path)
        remove_leftovers(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise IndexFileMissing("no saved index file") from exc
        except OSError as exc:  # permissions, a folder in its place, an I/O error: a real problem
            raise IndexFileError(f"index file cannot be read ({exc.strerror})") from exc
        try:
            if raw[: len(MAGIC)] != MAGIC:
                raise ValueError("not a Visage index file")
            (size,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
            start = len(MAGIC) + 4
            header = json.loads(raw[start : start + size])
            if header.get("format") != FORMAT:
                raise IndexFileError(f"index file is of format {header.get('format')}, not {FORMAT} (another version)")
            payload = memoryview(raw)[start + size :]
            if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
                raise ValueError("its vectors do not match their checksum")
            inner = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except IndexFileError:
            raise
        except Exception as exc:  # struct, json and FAISS each raise their own types for a damaged file
            raise IndexFileError(f"index file is damaged ({exc})") from exc
        if header.get("kind") != config.kind:
            raise IndexFileError(f"index file is a {header.get('kind')} index; settings ask for {config.kind}")
        index = cls(int(header["dim"]), config, str(header["model_version"]))
        index._index = inner
        index.generation = int(header["generation"])
        index.store_id = str(header.get("store_id", ""))
        index.change_token = header.get("change_token")
        index.trained_on = int(header.get("trained_on", 0))
        index.tombstones = {int(i) for i in header.get("tombstones", [])}
        if inner.d != index.dim or len(index) != header["count"] or index.checksum() != header["ids_sha256"]:
            raise IndexFileError("index file does not match its own header")
        if config.kind == "hnsw":
            faiss.downcast_index(inner.index).hnsw.efSearch = config.hnsw_ef_search
        elif config.kind == "ivf":
            inner.nprobe = min(config.ivf_nprobe, inner.nlist)
        return index
