"""End-to-end ``POST /verify`` and ``POST /identify`` latency and throughput against a real service.

Starts ``visage serve`` (uvicorn) as a subprocess on a free 127.0.0.1 port with a temporary data folder, enrolls
``obama.jpg`` (and ``biden.jpg``, so identify has a choice), then drives it with a bounded closed-loop load
generator (httpx, one thread and one connection per client; each cell stops after ``--requests`` requests or
``--seconds`` seconds, whichever comes first) at 1, 4 and 16 concurrent clients. The probe is ``obama4.jpg``
centre-cropped to 4:3 and resized to 640x480 in memory (JPEG quality 90). Repeated for each number of uvicorn
workers (each worker gets ``--worker-threads`` torch threads: ``auto`` shares the cores out).

The load generator runs on the same machine and takes some CPU from the service; on 2 cores that is part of the
result. Loopback only; nothing leaves the machine.

    python bench/service.py --workers 1 2 4 --out docs/BENCHMARKS.md
    OMP_NUM_THREADS=1 python bench/service.py --quick       # smoke test (< 1 minute)
"""

from __future__ import annotations

import io
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import (
    API_KEY,
    Server,
    command_line,
    emit,
    machine,
    machine_line,
    md_table,
    mib,
    parser,
    photos_dir,
    progress,
    stats,
    weights_file,
    worker_threads,
)
from PIL import Image, ImageOps

ENDPOINTS = ("verify", "identify")


def probe_jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    img = Image.open(photos_dir() / "obama4.jpg").convert("RGB")
    img = ImageOps.fit(img, size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def request_fn(endpoint: str, image: bytes):
    fields = {"subject": "obama"} if endpoint == "verify" else {"k": "5"}

    def send(client: httpx.Client) -> int:
        r = client.post(f"/{endpoint}", files={"image": ("probe.jpg", image, "image/jpeg")}, data=fields)
        return r.status_code

    return send


def load(url: str, send, clients: int, max_requests: int, max_seconds: float) -> dict:
    """Closed loop: ``clients`` threads, each sending one request after another, until ``max_requests`` have been
    started or ``max_seconds`` have passed (requests in flight then finish)."""
    lock = threading.Lock()
    started = [0]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120.0) as client:
            while True:
                with lock:
                    if started[0] >= max_requests or time.perf_counter() > deadline:
                        return
                    started[0] += 1
                t = time.perf_counter()
                try:
                    code = send(client)
                except httpx.HTTPError:
                    code = -1
                dt = time.perf_counter() - t
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        latencies.append(dt)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": statuses,
        "wall_s": wall,
        "rps": ok / wall if wall else 0.0,
        "latency_ms": stats(latencies),
    }


def enroll(url: str) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120.0) as client:
        for subject, rel in (("obama", "obama.jpg"), ("biden", "biden.jpg")):
            data = (photos_dir() / rel).read_bytes()
            r = client.post("/enroll", files={"image": (rel, data)}, data={"subject": subject})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"enrolling {rel} failed: {r.status_code} {r.text[:300]}")


def run_config(workers: int, threads: int | None, weights: Path, image: bytes, args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory(prefix="visage-bench-service-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {"VISAGE_INFERENCE_THREADS": str(args.inference_threads)} if args.inference_threads else {}
        progress(f"starting visage serve: {workers} worker(s), {threads or 'inherited'} torch threads each")
        with Server(data_dir, weights, workers=workers, threads=threads, env=env) as server:
            enroll(server.url)
            info = {"workers": workers, "threads": threads, "ready_s": server.ready_seconds}
            rows = []
            for endpoint in ENDPOINTS:
                send = request_fn(endpoint, image)
                for clients in args.clients:
                    # warm-up: a burst at this concurrency (reaches every worker), not recorded
                    load(server.url, send, clients, max(args.warmup, 2 * clients), args.seconds)
                    r = load(server.url, send, clients, args.requests, args.seconds)
                    if r["errors"]:
                        progress(f"  {endpoint} x{clients}: {r['errors']} errors {r['statuses']}")
                    progress(
                        f"  {endpoint:8s} clients={clients:2d}: {r['ok']} ok, {r['rps']:.1f} req/s, "
                        f"p50 {r['latency_ms'].get('median', float('nan')):.0f} ms"
                    )
                    rows.append({"workers": workers, "threads": threads, "endpoint": endpoint, **r})
            info["rss_mib_after"] = mib(server.rss())
            info["pss_mib_after"] = mib(server.pss())
            info["processes"] = len(server.pids())
    return rows, info


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker counts (default: 1 2)")
    ap.add_argument(
        "--worker-threads",
        default="auto",
        help="torch threads per worker: auto (cores / workers, capped by OMP_NUM_THREADS if set), inherit, or N",
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default 1 4 16)")
    ap.add_argument("--requests", type=int, default=300, help="most requests per cell (default 300)")
    ap.add_argument("--seconds", type=float, default=30.0, help="most seconds per cell (default 30)")
    ap.add_argument("--warmup", type=int, default=4, help="least warm-up requests per cell (default 4)")
    ap.add_argument("--inference-threads", type=int, help="VISAGE_INFERENCE_THREADS (default: the app's)")
    ap.add_argument("--weights", help="weights bundle (default: the shipped one, else a fresh default network)")
    ap.add_argument("--target-ms", type=float, default=100.0, help="the /verify p50 target at 1 client (100)")
    args = ap.parse_args()
    if args.quick:
        args.workers = args.workers if "--workers" in sys.argv else [1]
        args.requests, args.seconds, args.warmup = 20, 4.0, 2
    info = machine(extra=f"httpx {httpx.__version__}")
    started = time.perf_counter()
    image = probe_jpeg()
    all_rows, configs = [], []
    with tempfile.TemporaryDirectory(prefix="visage-bench-weights-") as wtmp:
        weights, source = weights_file(args.weights, Path(wtmp))
        for workers in args.workers:
            rows, cfg = run_config(workers, worker_threads(args.worker_threads, workers), weights, image, args)
            all_rows += rows
            configs.append(cfg)
    table = md_table(
        ["workers", "threads/worker", "endpoint", "clients", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"],
        [
            [
                r["workers"],
                r["threads"] or "inherited",
                f"/{r['endpoint']}",
                r["clients"],
                r["ok"],
                r["errors"],
                r["rps"],
                r["latency_ms"].get("median"),
                r["latency_ms"].get("p95"),
                r["latency_ms"].get("p99"),
            ]
            for r in all_rows
        ],
        digits=1,
    )
    lines = []
    for endpoint in ENDPOINTS:
        for clients in args.clients:
            cell = [r for r in all_rows if r["endpoint"] == endpoint and r["clients"] == clients and r["ok"]]
            if cell:
                best = max(cell, key=lambda r: r["rps"])
                lines.append(
                    f"- /{endpoint}, {clients} client(s): most requests/s with {best['workers']} worker(s) "
                    f"({best['rps']:.1f} req/s, p50 {best['latency_ms']['median']:.0f} ms)"
                )
    single = [r for r in all_rows if r["endpoint"] == "verify" and r["clients"] == 1 and r["ok"]]
    if single:
        best = min(single, key=lambda r: r["latency_ms"]["median"])
        p50 = best["latency_ms"]["median"]
        verdict = "meets" if p50 < args.target_ms else "does not meet"
        lines.append(
            f"- Target /verify p50 < {args.target_ms:.0f} ms for 640x480 at 1 client: {p50:.0f} ms "
            f"({best['workers']} worker(s)) -- {verdict} it in this run."
        )
    lines += [
        f"- {c['workers']} worker(s): ready {c['ready_s']:.1f} s after start; after the run, {c['processes']} "
        f"processes with RSS {c['rss_mib_after']:.0f} MiB summed, PSS {c['pss_mib_after']:.0f} MiB (shared pages "
        "counted once)"
        for c in configs
    ]
    parts = [
        f"`{command_line()}`",
        machine_line(info),
        f"Service: `visage serve` ({source}, flat index, 2 subjects), probe 640x480 JPEG ({len(image) / 1024:.0f} "
        f"KiB), closed loop, at most {args.requests} requests or {args.seconds:.0f} s per cell after a warm-up burst.",
        table,
        "\n".join(lines),
    ]
    results = {
        "machine": info,
        "weights": source,
        "configs": configs,
        "rows": all_rows,
        "seconds": time.perf_counter() - started,
    }
    emit("service", "Service: /verify and /identify end to end", "\n\n".join(parts), results, args)
    return 0 if all(r["ok"] for r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
