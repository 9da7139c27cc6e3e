"""Held-out verification accuracy of each inference variant (fp32 ONNX Runtime, fused, int8 ...): the rule is that
a speed-up ships only if accuracy on the held-out LFW folds stays within 0.3 points of the eager network.

Every variant of ``bench/embedder_variants.py`` embeds the held-out faces of training's own split
(``training.loop.load_split``: every image of the people in View 2 folds 7-8 of ``lfw/pairs_dev.txt``, who never
entered training) from the aligned crops ``visage prepare`` made, with mirror averaging as the service does; the
n-fold LFW protocol (``training.evaluate.verify``) scores those folds' pairs. int8 calibration uses crops of the
split's *training* people only, so no test face is seen.
Speed per face is in docs/BENCHMARKS.md section 1 (``bench/embedder.py --variants``); this table is accuracy only.

    VISAGE_WORK_DIR=/work/cache python bench/variant_accuracy.py --out docs/BENCHMARKS.md
    VISAGE_WORK_DIR=/work/cache python bench/variant_accuracy.py --variants onnxruntime int8_static_ort
"""

from __future__ import annotations

import json
import time

import numpy as np
from common import command_line, emit, load_default_bundle, machine, machine_line, md_table, parser, progress
from embedder_variants import build_all

from model.tta import view_count
from training.config import load_config
from training.evaluate import verify
from training.loop import load_split

DEFAULT_VARIANTS = ["eager", "fused", "onnxruntime", "int8_dynamic", "int8_static_fx", "int8_static_ort"]
TOLERANCE = 0.3  # accuracy points (issue 5)


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--weights", help="weights bundle (default: the shipped one)")
    ap.add_argument("--folds", default="7,8", help="held-out 1-based folds of the pairs file (default 7,8)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help=f"(default {' '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--calibration", type=int, default=256, help="training-people crops for int8 calibration (256)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    ap.add_argument("--prepared", default="prepared/lfw",
                    help="LFW crops from visage prepare: a folder, relative to VISAGE_WORK_DIR (default prepared/lfw)")
    ap.add_argument("--no-flip", action="store_true",
                    help="one pass per face (default: as served, the bundle's test-time views mirror-averaged)")
    args = ap.parse_args()
    if args.quick:  # a smoke test: one pass a face, a small int8 calibration set, every sixth pair
        args.no_flip, args.calibration = True, min(args.calibration, 32)
    info = machine(args.threads)  # first: the load average of the machine, not of this script's own work

    bundle, source = load_default_bundle(args.weights)
    # training's own split: the same held-out people and pairs as validation during training
    overrides = [f"prepared={{lfw = {json.dumps(args.prepared)}}}", f"val_folds=[{args.folds}]"]
    split = load_split(load_config(None, overrides), need_teacher=False)
    chosen = np.arange(len(split.val_left))[:: 6 if args.quick else 1]  # (every fold, both kinds of pair)
    needed = (np.unique(np.concatenate([split.val_left[chosen], split.val_right[chosen]])) if args.quick
              else np.arange(len(split.val)))  # quick: only the images its pairs need; else every held-out face
    crops = split.val.crops[needed]
    left, right = np.searchsorted(needed, split.val_left[chosen]), np.searchsorted(needed, split.val_right[chosen])
    same, folds = split.val_same[chosen], split.val_folds[chosen]
    pick = np.random.default_rng(0).choice(len(split.train), size=min(args.calibration, len(split.train)),
                                           replace=False)
    calibration = split.train.crops[np.sort(pick)]

    net = bundle.build()
    variants, failed = build_all(net, calibration, args.threads, only=args.variants)
    results, reference = [], None
    for v in variants:
        v.embedder.flip = not args.no_flip  # as the service embeds
        v.embedder.shift = 0 if args.no_flip else bundle.test_time_shift
        progress(f"{v.key}: embedding {len(crops)} held-out images")
        start = time.perf_counter()
        emb = v.embedder.embed(crops)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = emb
        # scored as the service scores: the bundle's cohort normalisation (model/score_norm.py)
        result = verify(bundle.scorer.pairs(emb[left], emb[right]), same, folds)
        name = "eager, channels-last (the reference)" if v.key == "eager" else v.name
        results.append({"key": v.key, "name": name, "accuracy": result.accuracy, "std": result.accuracy_std,
                        "auc": result.auc, "tar_1e-3": result.tar_at_far.get("1e-3"),
                        "min_cosine_vs_first": float(np.min(np.sum(emb * reference, axis=1))), "seconds": seconds})
    base = results[0]["accuracy"] if results else 0.0
    rows = []
    for r in results:
        delta = 100 * (r["accuracy"] - base)
        r["delta_points"] = delta
        r["within_tolerance"] = abs(delta) <= TOLERANCE
        rows.append([r["name"], f"{100 * r['accuracy']:.2f} +- {100 * r['std']:.2f}", f"{delta:+.2f}",
                     "yes" if r["within_tolerance"] else "**no**", f"{r['auc']:.4f}",
                     f"{100 * r['tar_1e-3']:.1f}" if r["tar_1e-3"] is not None else "-",
                     f"{r['min_cosine_vs_first']:.4f}", f"{r['seconds']:.1f}"])
    passes = view_count(bundle.test_time_shift) * 2
    mode = "one pass" if args.no_flip else f"as served ({passes} passes a face: test-time views, mirror-averaged)"
    md = [f"`{command_line()}`", "", machine_line(info), "",
          f"{source}; {len(left)} held-out pairs (folds {args.folds}), {len(crops)} images, {mode}; int8 "
          f"calibration on {len(calibration)} crops of training people. Delta = accuracy minus the first row's "
          f"(the eager network); a variant may ship only within +-{TOLERANCE} points.", "",
          md_table(["variant", "held-out acc. %", "delta (points)", f"within {TOLERANCE}", "AUC", "TAR@1e-3 %",
                    "min cosine vs eager", "embed s"], rows)]
    if failed:
        md += ["", "Not built: " + "; ".join(f"{k}: {why}" for k, why in failed.items())]
    emit("variant-accuracy", "Accuracy of the inference variants on held-out folds", "\n".join(md),
         {"machine": info, "results": results, "failed": failed}, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
