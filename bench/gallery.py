"""Gallery search: identify latency and recall@1 of the app's FAISS indexes (flat, HNSW, IVF) at 10k, 100k, 1M faces.

The indexes are the app's own: ``app.index.FaceIndex`` with ``IndexConfig`` defaults (HNSW M=32, efSearch=128;
IVF nlist=1024 capped at N/39, nprobe=320), built exactly as ``FaceIndex.build`` does (the same ``_new_index``,
then ``add_with_ids``), in chunks so a long build prints progress, and searched through ``FaceIndex.search`` with
k=32, which is what ``Gallery.identify`` asks for with the default k=5. The search-time knob of each approximate
index (efSearch, nprobe) is also swept on the same built index.

Faces are synthetic but shaped like a face gallery: N/4 identities, each a random unit centre in 128-d; every face
is its identity's centre plus Gaussian noise, normalised, so two faces of one identity have cosine ~0.7 and
impostors ~0. A query is a fresh noisy view of an enrolled identity. recall@1 = the index's top-1 face is the exact
(flat) search's top-1 face; "identity@1" = the top-1 face belongs to the query's identity.

Scoring as served (``model.score_norm``): the index holds each face's vector plus its cohort column (129-d) and
queries carry a 1 there, as ``Gallery`` builds them; the cohort is ``--cohort`` synthetic faces of other identities
(default 4,096, k=16; ``--cohort 0`` gives the plain-cosine index's extra zero column). "exact" is the flat index on
the same vectors, i.e. the exact normalised score. Synthetic faces have no hubs, so their offsets vary little: the
extra column is nearly constant here, and recall on real faces could differ.

Memory per face: the FAISS serialisation size / N, and the growth of this process's RSS while the index was built.

    python bench/gallery.py --sizes 10000 100000 --out docs/BENCHMARKS.md
    python bench/gallery.py --sizes 1000000           # the 1M row: HNSW builds for minutes, with progress
    OMP_NUM_THREADS=1 python bench/gallery.py --quick  # smoke test (< 1 minute)
"""

from __future__ import annotations

import gc
import sys
import time

import faiss
import numpy as np
from common import (
    command_line,
    emit,
    interleaved,
    machine,
    machine_line,
    md_table,
    parser,
    progress,
    rss_bytes,
    stats,
    write_section,
)

from app.index import FaceIndex, IndexConfig
from app.runtime import trim_heap  # freed heap back to the OS: RSS growth then counts new allocations only
from model.score_norm import CohortNorm

DIM = 128
SEARCH_K = 32  # Gallery._rank_subjects: want = max(4 * k, 32) with the default k=5
MODEL_VERSION = "bench-synthetic"


def noise_sigma(same_cosine: float, dim: int = DIM) -> float:
    """Per-coordinate noise so that two noisy views of one unit centre have expected cosine ``same_cosine``:
    cos ~= 1 / (1 + dim * sigma^2)."""
    return float(np.sqrt((1.0 / same_cosine - 1.0) / dim))


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic_gallery(n: int, per_identity: int, same_cosine: float, seed: int = 0):
    """(vectors (n, 128) float32 unit, identity of each face, centres, sigma)."""
    rng = np.random.default_rng(seed)
    n_ids = max(1, n // per_identity)
    centres = unit(rng.standard_normal((n_ids, DIM), dtype=np.float32))
    identity = np.arange(n) % n_ids
    sigma = noise_sigma(same_cosine)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 200_000):  # chunks: bounded temporaries at 1M
        stop = min(n, start + 200_000)
        block = centres[identity[start:stop]] + sigma * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        vectors[start:stop] = unit(block)
    return vectors, identity, centres, sigma


def queries(centres: np.ndarray, identity: np.ndarray, n_queries: int, sigma: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    enrolled = np.unique(identity)
    who = rng.choice(enrolled, size=n_queries, replace=len(enrolled) < n_queries)
    q = unit(centres[who] + sigma * rng.standard_normal((n_queries, DIM), dtype=np.float32))
    return q, who


def build(kind: str, ids: np.ndarray, vectors: np.ndarray, chunk: int) -> tuple[FaceIndex, float, int]:
    """``FaceIndex.build`` step by step (``_new_index`` trained on all vectors, then ``add_with_ids`` in chunks,
    printing progress); returns the index, build seconds and RSS growth in bytes."""
    gc.collect()
    trim_heap()
    before = rss_bytes()
    start = time.perf_counter()
    index = FaceIndex(vectors.shape[1], IndexConfig(kind=kind), MODEL_VERSION)
    index._index = index._new_index(vectors)  # IVF: trained on the gallery, as FaceIndex.build does
    n = len(ids)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        index._add(ids[lo:hi], vectors[lo:hi])
        if n > chunk:
            done = time.perf_counter() - start
            eta = done / hi * (n - hi)
            progress(f"  {kind}: added {hi:,}/{n:,} ({done:.0f} s, about {eta:.0f} s left)")
    seconds = time.perf_counter() - start
    return index, seconds, max(0, rss_bytes() - before)


def set_knob(index: FaceIndex, value: int) -> None:
    """Set HNSW efSearch / IVF nprobe on a built index (what IndexConfig would set at build or load time)."""
    inner = index._index
    if index.kind == "hnsw":
        faiss.downcast_index(inner.index).hnsw.efSearch = value
    elif index.kind == "ivf":
        inner.nprobe = min(value, inner.nlist)


def knob_name(kind: str) -> str:
    return {"hnsw": "efSearch", "ivf": "nprobe"}.get(kind, "")


def one_size(n: int, args) -> list[dict]:
    progress(f"N={n:,}: generating {n // args.per_identity:,} identities x {args.per_identity} faces")
    vectors, identity, centres, sigma = synthetic_gallery(n, args.per_identity, args.same_cosine)
    ids = np.arange(1, n + 1, dtype=np.int64)
    q, who = queries(centres, identity, args.queries, sigma)
    # what Gallery puts in the index and asks it: the vectors plus the cohort column (model/score_norm.py)
    cohort = synthetic_gallery(args.cohort, args.per_identity, args.same_cosine, seed=7)[0] if args.cohort else None
    scorer = CohortNorm(cohort, min(16, len(cohort))) if cohort is not None else CohortNorm.plain(DIM)
    index_vectors = scorer.gallery_vectors(vectors)
    q_index = scorer.query_vectors(q)[0]
    rng = np.random.default_rng(2)
    n_ids = n // args.per_identity
    first = rng.integers(0, n - n_ids, 2000)  # face i and face i + n_ids share an identity
    same = np.sum(vectors[first] * vectors[first + n_ids], axis=1)
    a, b = rng.integers(0, n, 2000), rng.integers(0, n, 2000)
    keep = identity[a] != identity[b]
    impostor = np.sum(vectors[a[keep]] * vectors[b[keep]], axis=1)
    cosines = {
        "same_mean": float(same.mean()),
        "impostor_mean": float(impostor.mean()),
        "impostor_p99": float(np.percentile(impostor, 99)),
    }
    progress(
        f"  cosine: same identity {cosines['same_mean']:.3f}, impostors {cosines['impostor_mean']:.3f} "
        f"(p99 {cosines['impostor_p99']:.3f})"
    )

    rows = []
    exact_top1 = None
    for kind in args.kinds:
        progress(f"N={n:,}: building {kind}")
        index, seconds, rss_growth = build(kind, ids, index_vectors, args.chunk)
        serialized = faiss.serialize_index(index._index).nbytes
        knobs = [None] if kind == "flat" else sorted(set(args.ef_search if kind == "hnsw" else args.nprobe))
        default_knob = {"hnsw": IndexConfig().hnsw_ef_search, "ivf": IndexConfig().ivf_nprobe}.get(kind)
        if kind == "ivf":  # nprobe is capped at nlist (as set_knob and the app do): rows past it were duplicates
            nlist = int(index._index.nlist)
            knobs, default_knob = sorted({min(k, nlist) for k in knobs}), min(default_knob, nlist)
        for knob in knobs:
            if knob is not None:
                set_knob(index, knob)
            _, found = index.search(q_index, SEARCH_K)
            top1 = found[:, 0]
            if kind == "flat":
                exact_top1 = top1
            rows.append(
                {
                    "n": n,
                    "kind": kind,
                    "knob": knob,
                    "knob_name": knob_name(kind),
                    "default": knob is None or knob == default_knob,
                    "build_s": seconds,
                    "bytes_per_face": serialized / n,
                    "rss_growth_per_face": rss_growth / n,
                    "top1": top1,
                    "identity_at_1": float(np.mean(identity[top1 - 1] == who)),
                    "nlist": int(index._index.nlist) if kind == "ivf" else None,
                    "cosines": cosines,
                }
            )
        # latency: single-query searches (as identify does, one face at a time), interleaved across knobs
        fns = {}
        for row in rows:
            if row["kind"] != kind:
                continue

            def search_one(index=index, knob=row["knob"], it=iter(range(10**9))):
                if knob is not None:
                    set_knob(index, knob)
                index.search(q_index[next(it) % len(q_index)], SEARCH_K)

            fns[str(row["knob"])] = search_one
        samples = interleaved(
            fns,
            warmup=5,
            min_rounds=args.min_rounds,
            max_rounds=args.latency_queries,
            budget_s=args.seconds,
            label=f"N={n:,} {kind} latency",
        )
        for row in rows:
            if row["kind"] == kind:
                row["latency_ms"] = stats(samples[str(row["knob"])])
        del index, fns
        gc.collect()
    for row in rows:
        row["recall_at_1"] = float(np.mean(row.pop("top1") == exact_top1)) if exact_top1 is not None else None
    return rows


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="gallery sizes (10000 100000)")
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"], choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[128, 256, 512, 1024], help="HNSW efSearch sweep")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[64, 128, 256, 320, 512], help="IVF nprobe sweep")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000)")
    ap.add_argument("--latency-queries", type=int, default=500, help="most timed single queries per row (500)")
    ap.add_argument("--min-rounds", type=int, default=50, help="fewest timed queries per row (default 50)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget of each latency loop (default 30)")
    ap.add_argument("--per-identity", type=int, default=4, help="faces per identity (default 4: N/4 identities)")
    ap.add_argument("--same-cosine", type=float, default=0.7, help="expected same-identity cosine (default 0.7)")
    ap.add_argument("--chunk", type=int, default=100_000, help="faces added per step (progress granularity)")
    ap.add_argument("--threads", type=int, help="FAISS OpenMP threads (default: FAISS's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--target-ms", type=float, default=10.0, help="identify latency target at 1M (10 ms)")
    ap.add_argument("--cohort", type=int, default=4096, help="synthetic scoring cohort, as served (0: plain cosine)")
    args = ap.parse_args()
    if args.quick:
        args.sizes = args.sizes if "--sizes" in sys.argv else [10_000]
        args.queries, args.latency_queries, args.min_rounds, args.seconds = 200, 50, 20, 3.0
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    info = machine(extra=f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} FAISS threads")
    started = time.perf_counter()
    rows = []
    for n in args.sizes:
        rows += one_size(n, args)
    results = {"machine": info, "rows": rows, "seconds": time.perf_counter() - started}
    whole = render(rows, args.sizes, args, info)
    out, args.out = args.out, None
    emit("gallery", "Gallery search", whole, results, args)
    if out:  # one section per size, so the 1M row can be measured later without erasing the others
        for n in args.sizes:
            write_section(
                out, f"gallery-{size_label(n)}", f"Gallery search, {n:,} faces", render(rows, [n], args, info)
            )
        progress(f"wrote the gallery sections of {out}")
    return 0


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def render(rows: list[dict], sizes: list[int], args, info: dict) -> str:
    rows = [r for r in rows if r["n"] in sizes]
    table = md_table(
        [
            "faces",
            "index",
            "knob",
            "recall@1 vs exact",
            "identity@1",
            "search ms (median)",
            "p95",
            "p99",
            "build s",
            "bytes/face (serialised)",
            "RSS growth bytes/face",
        ],
        [
            [
                r["n"],
                r["kind"] + (f" (nlist {r['nlist']})" if r["nlist"] else ""),
                "-" if r["knob"] is None else f"{r['knob_name']}={r['knob']}{' (app default)' if r['default'] else ''}",
                f"{r['recall_at_1']:.4f}" if r["recall_at_1"] is not None else "-",
                f"{r['identity_at_1']:.4f}",
                r["latency_ms"]["median"],
                r["latency_ms"]["p95"],
                r["latency_ms"]["p99"],
                r["build_s"],
                r["bytes_per_face"],
                r["rss_growth_per_face"],
            ]
            for r in rows
        ],
        digits=3,
    )
    lines = []
    for n in sizes:
        ok = [r for r in rows if r["n"] == n and (r["recall_at_1"] or 0) >= 0.99]
        if ok:
            best = min(ok, key=lambda r: r["latency_ms"]["median"])
            knob = "" if best["knob"] is None else f" {best['knob_name']}={best['knob']}"
            lines.append(
                f"- {n:,} faces: fastest with recall@1 >= 0.99 is {best['kind']}{knob}, "
                f"{best['latency_ms']['median']:.2f} ms median (recall {best['recall_at_1']:.4f})"
            )
        if n == 1_000_000:
            met = any(r["latency_ms"]["median"] < args.target_ms for r in ok)
            lines.append(
                f"- Target at 1M: identify under {args.target_ms:.0f} ms with recall@1 >= 0.99 -- "
                f"{'met' if met else 'not met'} in this run."
            )
    c = rows[0]["cosines"] if rows else {}
    return "\n\n".join(
        [
            f"`{command_line()}`",
            machine_line(info),
            f"Synthetic gallery: N/{args.per_identity} identities, same-identity cosine {c.get('same_mean', 0):.2f}, "
            f"impostors {c.get('impostor_mean', 0):.3f} (p99 {c.get('impostor_p99', 0):.2f}); {args.queries} queries "
            f"(fresh noisy views of enrolled identities); scored as served ("
            f"{'cohort of ' + format(args.cohort, ',') + ' synthetic faces, k=16' if args.cohort else 'plain cosine'}"
            f": 129-d index vectors); `FaceIndex.search(query, k={SEARCH_K})` one query at a "
            "time, as `Gallery.identify` calls it (the SQLite lookup of the hits' subjects is not included: see the "
            "service benchmark). Bytes/face (serialised) is the index's steady footprint; RSS growth is this "
            "process's RSS after the build minus before it (heap trimmed first), so it also holds build temporaries "
            "such as IVF's k-means.",
            table,
            "\n".join(lines),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
