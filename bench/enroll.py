"""Batch enrollment throughput: ``visage enroll DIR`` on a subset of LFW into a temporary data folder.

Builds ``DIR/<person>/<image>`` from ``--limit`` images of ``../shared/data/lfw/images`` (symlinks, whole people
in sorted order until the limit is reached), runs ``visage enroll DIR --data-dir TMP --json --no-progress``
exactly as a user would (a subprocess), and reports photos/s from the command's own timer (the enrollment loop)
and from the wall clock (which adds start-up: imports, loading the model and MTCNN). Then runs the same command
again: every image is already enrolled and is skipped by its sha256 before the model runs (the resume path).

LFW images are 160x160 centre crops, so MTCNN sees little context and some fail with no_face_found; failures are
counted, not hidden (``visage enroll`` exits 1 when any file failed; that is expected here).

    python bench/enroll.py --limit 500 --out docs/BENCHMARKS.md
    OMP_NUM_THREADS=1 python bench/enroll.py --quick      # smoke test: 24 images
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    command_line,
    emit,
    machine,
    machine_line,
    md_table,
    parser,
    progress,
    shared_data,
    weights_file,
)


def subset(src: Path, dst: Path, limit: int) -> tuple[int, int]:
    """Symlink whole people (sorted) into ``dst`` until ``limit`` images; returns (images, people)."""
    images = people = 0
    for person in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in person.iterdir() if f.suffix.lower() == ".jpg")[: limit - images]
        if not files:
            continue
        (dst / person.name).mkdir(parents=True)
        for f in files:
            (dst / person.name / f.name).symlink_to(f.resolve())
        images += len(files)
        people += 1
        if images >= limit:
            break
    return images, people


def enroll(folder: Path, data_dir: Path, weights: Path, env: dict[str, str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "model.console", "enroll", str(folder), "--data-dir", str(data_dir)]
    cmd += ["--weights", str(weights), "--json", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"visage enroll failed ({proc.returncode}):\n{proc.stderr[-2000:]}") from exc
    errors: dict[str, int] = {}
    for f in report.get("failures", []):
        errors[f["error"]] = errors.get(f["error"], 0) + 1
    return {
        "exit_code": proc.returncode,
        "files": report["files"],
        "created": report["created"],
        "existing": report["existing"],
        "failed": report["failed"],
        "failure_codes": errors,
        "loop_s": report["seconds"],
        "wall_s": wall,
        # the command rounds its timer to 10 ms: a loop faster than that has no meaningful rate
        "photos_per_s": report["files"] / report["seconds"] if report["seconds"] >= 0.05 else None,
        "photos_per_s_wall": report["files"] / wall,
    }


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--limit", type=int, default=500, help="LFW images to enroll (default 500)")
    ap.add_argument("--lfw", type=Path, help="LFW images folder (default: ../shared/data/lfw/images)")
    ap.add_argument("--weights", help="weights bundle (default: the shipped one, else a fresh default network)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the enroll command (default: inherited)")
    ap.add_argument("--flip", choices=["on", "off", "both"], default="on", help="VISAGE_FLIP (default on, the app's)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="most seconds one enroll command may take")
    args = ap.parse_args()
    if args.quick:
        args.limit = min(args.limit, 24) if "--limit" not in sys.argv else args.limit
    src = args.lfw or shared_data() / "lfw" / "images"
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    info = machine(threads=int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="visage-bench-enroll-") as tmp:
        tmp = Path(tmp)
        images, people = subset(src, tmp / "photos", args.limit)
        weights, source = weights_file(args.weights, tmp)
        for flip in ["on", "off"] if args.flip == "both" else [args.flip]:
            run_env = {**env, "VISAGE_FLIP": "true" if flip == "on" else "false"}
            data_dir = tmp / f"data-flip-{flip}"
            for label in ("first run", "second run (all already enrolled)"):
                progress(f"visage enroll: {images} images of {people} people, flip {flip}, {label}")
                r = enroll(tmp / "photos", data_dir, weights, run_env, args.timeout)
                rows.append({"flip": flip, "run": label, **r})
                progress(f"  {r['loop_s']:.2f} s loop, {r['wall_s']:.1f} s wall, exit code {r['exit_code']}")
    table = md_table(
        ["flip", "run", "images", "enrolled", "skipped", "failed", "loop s", "photos/s", "wall s", "photos/s wall"],
        [
            [
                r["flip"],
                r["run"],
                r["files"],
                r["created"],
                r["existing"],
                r["failed"],
                r["loop_s"],
                r["photos_per_s"],
                r["wall_s"],
                r["photos_per_s_wall"],
            ]
            for r in rows
        ],
        digits=1,
    )
    failures = rows[0]["failure_codes"]
    parts = [
        f"`{command_line()}`",
        machine_line(info),
        f"`visage enroll` of {images} LFW images ({people} people, 160x160 crops) into an empty temporary store "
        f"({source}); 'photos/s' = images / the command's own loop time, 'wall' includes start-up.",
        table,
    ]
    if failures:
        parts.append(
            "Failures (first run): " + ", ".join(f"{k} x{v}" for k, v in failures.items()) + " -- tight LFW crops "
            "give MTCNN little context; a failed image is detected again on every run (nothing is stored for it)."
        )
    results = {"machine": info, "images": images, "people": people, "rows": rows}
    results["seconds"] = time.perf_counter() - started
    emit("enroll", "Batch enrollment throughput", "\n\n".join(parts), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
