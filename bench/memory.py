"""Resident memory of the service (empty, 100k and 1M enrolled faces) and peak memory of a short training run.

Service: for each gallery size, a temporary data folder is filled with synthetic faces through the app's store
(``app.store.Store``: one ``Store.write()`` transaction per 100k faces inserting the same rows ``Store.add_face``
writes, so the triggers fill the change log; N/4 subjects, unit 128-d embeddings shaped like the gallery
benchmark's, the served model's version, no stored images), then ``visage serve`` starts on it and its memory is
read from /proc/PID/status: VmRSS once ``/readyz`` answers (the first start rebuilds the FAISS index from the
store), VmHWM (the peak while loading), the anonymous / file-backed split, RSS after a few ``/identify`` requests,
and RSS after a restart that loads the saved index instead of rebuilding it. Summed over uvicorn's processes.

Training: ``visage train --config training/configs/default.toml --max-steps 5 epochs=1`` (the default P x K batch)
into a temporary run folder, only when prepared data exists under ``$VISAGE_WORK_DIR`` (``prepared/lfw``); peak
RSS is the child's ``ru_maxrss`` (read with ``os.wait4`` for that child alone, so an earlier, larger service
subprocess cannot mask it, which ``getrusage(RUSAGE_CHILDREN)`` would).

    VISAGE_WORK_DIR=/work/cache python bench/memory.py --sizes 0 100000 1000000 --out docs/BENCHMARKS.md
    OMP_NUM_THREADS=1 VISAGE_WORK_DIR=/work/cache python bench/memory.py --quick   # smoke test
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import (
    API_KEY,
    REPO,
    Server,
    command_line,
    emit,
    hwm_bytes,
    machine,
    machine_line,
    md_table,
    mib,
    parser,
    photos_dir,
    progress,
    pss_bytes,
    weights_file,
    work_dir,
    worker_threads,
)

DIM_DEFAULT = 128


def status_fields(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of one process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def server_memory(server: Server) -> dict[str, int]:
    total: dict[str, int] = {}
    for pid in server.pids():
        for k, v in status_fields(pid).items():
            total[k] = total.get(k, 0) + v
        total["Pss"] = total.get("Pss", 0) + pss_bytes(pid)
    total["processes"] = len(server.pids())
    return total


def fill_store(db_path: Path, n: int, model_version: str, dim: int, per_identity: int = 4, chunk: int = 100_000):
    """N synthetic faces of N/per_identity subjects, written through ``Store.write()`` transactions."""
    from app.store import Store, now

    store = Store(db_path)
    try:
        if n == 0:
            return 0
        rng = np.random.default_rng(0)
        n_subjects = max(1, n // per_identity)
        stamp = now()
        with store.write() as conn:
            conn.executemany(
                "INSERT INTO subjects (name, metadata, created_at) VALUES (?, '{}', ?)",
                ((f"person-{i:07d}", stamp) for i in range(n_subjects)),
            )
        centres = rng.standard_normal((n_subjects, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        sigma = float(np.sqrt((1 / 0.7 - 1) / dim))
        box = json.dumps([10.0, 10.0, 110.0, 110.0])
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            subject = np.arange(lo, hi) % n_subjects
            vec = centres[subject] + sigma * rng.standard_normal((hi - lo, dim), dtype=np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            rows = (
                (
                    int(subject[j]) + 1,
                    vec[j].astype("<f4").tobytes(),
                    model_version,
                    hashlib.sha256(f"synthetic-{lo + j}".encode()).hexdigest(),
                    box,
                    0.99,
                    stamp,
                )
                for j in range(hi - lo)
            )
            with store.write() as conn:
                conn.executemany(
                    "INSERT INTO faces (subject_id, embedding, model_version, image_sha256, box, quality, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            progress(f"  store: {hi:,}/{n:,} faces")
        current = store.counts(model_version)["current_faces"]
        if current != n:
            raise RuntimeError(f"the store holds {current} current faces, expected {n}")
        return current
    finally:
        store.close()


def probe() -> bytes:
    from PIL import Image, ImageOps

    img = ImageOps.fit(Image.open(photos_dir() / "obama4.jpg").convert("RGB"), (640, 480))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def identify_a_few(server: Server, image: bytes, n: int) -> list[int]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=300.0) as client:
        return [
            client.post("/identify", files={"image": ("p.jpg", image, "image/jpeg")}, data={"k": "5"}).status_code
            for _ in range(n)
        ]


def service_rows(args) -> list[dict]:
    from model.bundle import load_bundle

    rows = []
    image = probe()
    with tempfile.TemporaryDirectory(prefix="visage-bench-memory-") as tmp:
        tmp = Path(tmp)
        weights, source = weights_file(args.weights, tmp)
        bundle = load_bundle(weights)
        version, dim = bundle.model_version, bundle.config.embedding_dim
        threads = worker_threads(args.worker_threads, args.workers)
        for kind in args.index_types:
            for n in args.sizes:
                data_dir = tmp / f"data-{kind}-{n}"
                progress(f"N={n:,}: filling the store ({kind} index)")
                t = time.perf_counter()
                fill_store(data_dir / "visage.db", n, version, dim)
                fill_s = time.perf_counter() - t
                env = {"VISAGE_INDEX_TYPE": kind}
                row = {"n": n, "index": kind, "weights": source, "fill_s": fill_s, "workers": args.workers}
                for start in ("first start (index rebuilt from the store)", "restart (saved index loaded)"):
                    if start.startswith("restart") and n == 0:
                        continue
                    progress(f"N={n:,}: {start}")
                    with Server(
                        data_dir,
                        weights,
                        workers=args.workers,
                        threads=threads,
                        env=env,
                        ready_timeout=args.ready_timeout,
                    ) as server:
                        mem = server_memory(server)
                        hwm = sum(hwm_bytes(p) for p in server.pids())
                        codes = identify_a_few(server, image, args.identify)
                        after = server_memory(server)
                        rows.append(
                            {
                                **row,
                                "start": start,
                                "ready_s": server.ready_seconds,
                                "index_state": server.ready.get("index_state"),
                                "indexed_faces": server.ready.get("indexed_faces"),
                                "ready": mem,
                                "peak_loading": hwm,
                                "after_identify": after,
                                "identify_status": codes,
                            }
                        )
                    progress(
                        f"  RSS {mib(mem.get('VmRSS', 0)):.0f} MiB at ready, peak {mib(hwm):.0f} MiB, "
                        f"{mib(after.get('VmRSS', 0)):.0f} MiB after {len(codes)} identify {sorted(set(codes))}"
                    )
                db = data_dir / "visage.db"
                rows[-1]["db_mib"] = mib(db.stat().st_size + sum(p.stat().st_size for p in data_dir.glob("*-wal")))
    return rows


def training_row(args) -> dict:
    manifest = work_dir() / "prepared" / "lfw" / "manifest.csv"
    if not manifest.is_file():
        return {"skipped": f"no prepared data at {manifest.parent} (set VISAGE_WORK_DIR)"}
    with tempfile.TemporaryDirectory(prefix="visage-bench-train-") as tmp:
        cmd = [sys.executable, "-m", "model.console", "train", "--config", str(REPO / "training/configs/default.toml")]
        cmd += ["--run-dir", str(Path(tmp) / "run"), "--max-steps", str(args.train_steps), "epochs=1"]
        env = {**os.environ, "VISAGE_WORK_DIR": str(work_dir())}
        progress(f"training: {' '.join(cmd[3:])}")
        log = Path(tmp) / "train.log"
        start = time.perf_counter()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"skipped": f"visage train exited {proc.returncode}: {log.read_text()[-500:]}"}
        from training.config import load_config

        cfg = load_config(REPO / "training/configs/default.toml", ["epochs=1"])
        return {
            "peak_rss": usage.ru_maxrss * 1024,  # Linux reports KiB
            "wall_s": wall,
            "steps": args.train_steps,
            "batch": cfg.p * cfg.k,
            "p": cfg.p,
            "k": cfg.k,
            "work_dir": str(work_dir()),
        }


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000], help="faces (0 100000 1000000)")
    ap.add_argument("--index-types", nargs="+", default=["flat"], choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    ap.add_argument("--worker-threads", default="inherit", help="torch threads per worker: inherit (default), auto, N")
    ap.add_argument("--identify", type=int, default=5, help="/identify requests before the second reading (5)")
    ap.add_argument("--weights", help="weights bundle (default: the shipped one, else a fresh default network)")
    ap.add_argument("--ready-timeout", type=float, default=1800.0, help="most seconds to wait for /readyz")
    ap.add_argument("--train-steps", type=int, default=5, help="training steps for the peak (default 5)")
    ap.add_argument("--no-service", action="store_true", help="skip the service measurements")
    ap.add_argument("--no-train", action="store_true", help="skip the training measurement")
    ap.add_argument("--target-mib", type=float, default=1024.0, help="service RSS target with 100k faces (1024)")
    args = ap.parse_args()
    if args.quick:
        args.sizes = args.sizes if "--sizes" in sys.argv else [0, 10_000]
        args.identify, args.train_steps = 2, min(args.train_steps, 2)
    info = machine(extra="" if args.no_service else f"{args.workers} uvicorn worker(s)")
    started = time.perf_counter()
    parts = [f"`{command_line()}`", machine_line(info)]
    results: dict = {"machine": info}
    if not args.no_service:
        rows = service_rows(args)
        results["service"] = rows
        table = md_table(
            [
                "faces",
                "index",
                "start",
                "ready s",
                "RSS at ready (MiB)",
                "anon / file MiB",
                "PSS at ready (MiB)",
                "peak while loading (MiB)",
                f"RSS after {args.identify} identify (MiB)",
                "store MiB",
            ],
            [
                [
                    r["n"],
                    r["index"],
                    r["start"],
                    r["ready_s"],
                    mib(r["ready"].get("VmRSS", 0)),
                    f"{mib(r['ready'].get('RssAnon', 0)):.0f} / {mib(r['ready'].get('RssFile', 0)):.0f}",
                    mib(r["ready"].get("Pss", 0)),
                    mib(r["peak_loading"]),
                    mib(r["after_identify"].get("VmRSS", 0)),
                    r.get("db_mib"),
                ]
                for r in rows
            ],
            digits=1,
        )
        lines = [
            f"Service: `visage serve`, {args.workers} worker(s), {rows[0]['weights'] if rows else ''}; synthetic "
            "faces written through `Store.write()`; RSS (VmRSS) summed over the server's processes, PSS with shared "
            "pages counted once. 'file' is mapped library code (torch, MKL, FAISS), shared between workers and "
            "reclaimable; 'anon' is the processes' own heap (model, index, SQLite cache)."
        ]
        at_100k = [r for r in rows if r["n"] == 100_000]
        if at_100k:
            worst = max(max(r["ready"].get("VmRSS", 0), r["after_identify"].get("VmRSS", 0)) for r in at_100k)
            verdict = "meets" if mib(worst) < args.target_mib else "does not meet"
            lines.append(
                f"Target: service < {args.target_mib:.0f} MiB RSS with 100k faces: {mib(worst):.0f} MiB at most -- "
                f"{verdict} it in this run."
            )
        parts += ["### Service resident memory", lines[0], table, *lines[1:]]
    if not args.no_train:
        train = training_row(args)
        results["training"] = train
        parts.append("### Training peak memory")
        if "skipped" in train:
            parts.append(f"Not measured: {train['skipped']}")
        else:
            parts.append(
                md_table(
                    ["run", "batch (P x K)", "peak RSS (MiB)", "wall s"],
                    [
                        [
                            f"visage train default.toml --max-steps {train['steps']} epochs=1",
                            f"{train['batch']} ({train['p']} x {train['k']})",
                            mib(train["peak_rss"]),
                            train["wall_s"],
                        ]
                    ],
                    digits=1,
                )
            )
            parts.append(
                f"Peak = the child's ru_maxrss (os.wait4); prepared data from {train['work_dir']}; includes the "
                "epoch-end validation and the final calibration on the held-out folds."
            )
    results["seconds"] = time.perf_counter() - started
    emit("memory", "Memory: service and training", "\n\n".join(parts), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
