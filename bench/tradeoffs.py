"""Train the MobileNet paper's trade-off grid on these faces and print one Markdown table.

Each variant is one ``visage train`` run with the same budget (``--epochs``) on the same data and held-out
folds; the table gives held-out accuracy next to mult-adds, parameters and measured CPU ms per face, so the
width/resolution knobs, the loss terms and the miners are compared by measurement, not claimed.

    python bench/tradeoffs.py --epochs 4 --max-steps 60 --out docs/tradeoffs.md   # all variants, resumable
    python bench/tradeoffs.py --only alpha0.25 alpha1.0 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS: dict[str, list[str]] = {
    # width multiplier at 112 px (distillation + batch-hard triplets)
    "alpha0.25": ["alpha=0.25"],
    "alpha0.5": [],
    "alpha0.75": ["alpha=0.75"],
    "alpha1.0": ["alpha=1.0"],
    # resolution multiplier at alpha 0.5
    "res96": ["resolution=96"],
    "res128": ["resolution=128"],
    # objective
    "triplet-only": ["w_distill=0"],
    "distill-only": ["w_triplet=0"],
    # miners (with distillation, as in the default recipe)
    "semi-hard": ["miner=semi_hard"],
    "batch-all": ["miner=batch_all"],
}


def cpu_ms_per_face(bundle_path: Path, batch: int, repeats: int = 20) -> float:
    from model.bundle import load_bundle
    from model.embedder import Embedder

    emb = Embedder(load_bundle(bundle_path), flip=False, batch_size=batch, views=False)  # the network alone
    crops = np.random.default_rng(0).integers(0, 255, (batch, 112, 112, 3), dtype=np.uint8)
    emb.embed(crops)
    t = time.perf_counter()
    for _ in range(repeats):
        emb.embed(crops)
    return (time.perf_counter() - t) / (repeats * batch) * 1000


def run(name: str, overrides: list[str], epochs: int, runs: Path, config: Path, max_steps: int | None,
        train_threads: int) -> dict:
    run_dir = runs / name
    bundle = run_dir / "bundle.pt"
    if not bundle.exists():
        cmd = [sys.executable, "-m", "model.console", "train", "--config", str(config), "--run-dir", str(run_dir),
               f"epochs={epochs}", f"threads={train_threads}", "test_time_shift=0", *overrides]  # crop + mirror
        if max_steps:
            cmd += ["--max-steps", str(max_steps)]
        if (run_dir / "last.pt").exists():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    from model.bundle import load_bundle

    meta = load_bundle(bundle).metadata
    val = meta["validation"]
    return {
        "variant": name,
        "overrides": " ".join(overrides) or "(default recipe)",
        "accuracy": val["accuracy"],
        "accuracy_std": val["accuracy_std"],
        "auc": val["auc"],
        "mult_adds": meta.get("mult_adds"),
        "params": meta.get("params"),
        "ms_b1": cpu_ms_per_face(bundle, 1),
        "ms_b64": cpu_ms_per_face(bundle, 64),
        "train_minutes": meta["train_seconds"] / 60,
        "epochs": meta["epochs_run"],
    }


def table(rows: list[dict]) -> str:
    out = ["| variant | overrides | held-out acc. | AUC | mult-adds | params | CPU ms/face (b=1) | CPU ms/face (b=64) "
           "| train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ma = f"{r['mult_adds'] / 1e6:.1f}M" if r["mult_adds"] else "-"
        acc = f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}"
        cells = [r["variant"], f"`{r['overrides']}`", acc, f"{r['auc']:.4f}", ma, f"{r['params'] / 1e6:.2f}M",
                 f"{r['ms_b1']:.2f}", f"{r['ms_b64']:.2f}", f"{r['train_minutes']:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default: all)")
    ap.add_argument("--runs", type=Path, default=Path("runs/tradeoffs"))
    ap.add_argument("--config", type=Path, default=Path("training/configs/default.toml"))
    ap.add_argument("--out", type=Path, help="also write the table (and raw JSON beside it) here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the latency measurement")
    ap.add_argument("--train-threads", type=int, default=0, help="torch threads for training (0: default)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap batches per epoch (a smaller equal budget)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.only or list(VARIANTS):
        rows.append(run(name, VARIANTS[name], args.epochs, args.runs, args.config, args.max_steps,
                        args.train_threads))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
