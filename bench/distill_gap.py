"""Where the student falls short of its teacher, on the held-out LFW folds (training's own split):

1. The input ceiling: dlib's network (the teacher) on its own 150 px chip, and on only what the student gets: the
   student's aligned view at each input size, warped back into the chip frame (grey where the student's crop
   ends). If the teacher stays accurate on the student's view, the student's input holds what it needs and the
   gap is in the student's network and training.
2. The fit: for each weights bundle, how close the student's embedding is to the teacher's (centred, unit
   length: the training target) on training faces and on held-out faces, how well it reproduces the teacher's
   pair scores, and its held-out accuracy. A train/held-out difference is a generalisation gap, not capacity.

Views are un-augmented, one pass (no mirror averaging), cosine on centred teacher descriptors. Needs the
teacher extra and prepared folders with landmarks (``visage prepare`` since session 3).

    VISAGE_WORK_DIR=/work/cache python bench/distill_gap.py --out docs/TRAINING.md \\
        --weights model/weights/visage-mobilenet_v1-a0.5-r112.pt model/weights/visage-mobilenet_v1-a1.0-r112.pt
"""

from __future__ import annotations

import numpy as np
import torch
from common import command_line, emit, machine, machine_line, md_table, parser, progress, set_threads

from model.bundle import load_bundle
from model.embedder import Embedder
from training.config import load_config
from training.data import Augment
from training.evaluate import verify
from training.loop import load_split, load_teacher_net, load_views
from training.views import ViewAugment, student_view_as_chip

STILL = ViewAugment(Augment(flip=0, max_shift=0, max_scale=0, max_rotate_deg=0, colour=0, grey=0))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def teacher_on_views(views, n: int, net, resolution: int | None, batch: int = 128) -> np.ndarray:
    """Teacher descriptors of faces 0..n-1: on the chip (``resolution`` None) or on the student's view."""
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        x, chips, _ = views.draw(idx, resolution or 112, STILL, torch.Generator().manual_seed(0))
        if resolution is not None:
            chips = student_view_as_chip(x, views.student[idx], views.teacher[idx])
        with torch.no_grad():
            out.append(net(chips.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--weights", nargs="*", default=[], help="student bundles to compare (default: none)")
    ap.add_argument("--resolutions", nargs="*", type=int, default=[96, 112, 128, 160],
                    help="student input sizes for the ceiling table (default 96 112 128 160)")
    ap.add_argument("--config", default="training/configs/online.toml",
                    help="training config whose data and held-out folds to use (default online.toml)")
    ap.add_argument("--set", nargs="*", default=['prepared={lfw="prepared2/lfw",celeba="prepared2/celeba"}'],
                    metavar="KEY=VALUE", help="config overrides (default: the prepared2 folders)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    cfg = load_config(args.config, args.set)
    split = load_split(cfg, need_teacher=True)
    val = split.val
    left, right, same, folds = split.val_left, split.val_right, split.val_same, split.val_folds
    if args.quick:  # 15 matched and 15 mismatched pairs of each fold and their faces only: a smoke test
        keep = np.concatenate([np.nonzero((folds == f) & (same == s))[0][:15]
                               for f in np.unique(folds) for s in (True, False)])
        used = np.unique(np.concatenate([left[keep], right[keep]]))
        remap = {int(o): n for n, o in enumerate(used)}
        val = val.subset(np.isin(np.arange(len(val)), used))
        left, right = np.array([remap[int(i)] for i in left[keep]]), np.array([remap[int(i)] for i in right[keep]])
        same, folds = same[keep], folds[keep]
        args.resolutions = args.resolutions[:1]
    centre = np.concatenate([split.train.teacher, split.train.teacher_flip]).mean(0)

    def score(emb: np.ndarray) -> dict:
        return verify(np.sum(emb[left] * emb[right], axis=1), same, folds).to_dict()

    progress(f"teacher on {len(val)} held-out faces: chip, then student views at {args.resolutions}")
    views, net = load_views(cfg, val, progress=False), load_teacher_net(torch.device("cpu"))
    ceiling = []
    for res in [None, *args.resolutions]:
        r = score(unit(teacher_on_views(views, len(val), net, res) - centre))
        ceiling.append({"input": "teacher's own 150 px chip" if res is None else f"student's view, {res} px",
                        "resolution": res, "accuracy": r["accuracy"], "std": r["accuracy_std"], "auc": r["auc"]})

    rng = np.random.default_rng(0)
    train = split.train.subset(np.isin(np.arange(len(split.train)),
                                       rng.choice(len(split.train), len(val), replace=False)))
    fits = []
    for w in args.weights:
        progress(f"{w}: embedding {len(train)} training and {len(val)} held-out faces")
        emb = Embedder(load_bundle(w), flip=False)
        row: dict = {"weights": w}
        for name, faces in (("train", train), ("held_out", val)):
            s, t = emb.embed(faces.crops), unit(faces.teacher - centre)
            cos = np.sum(s * t, axis=1)
            iu = np.triu_indices(len(s), 1)
            pick = rng.choice(len(iu[0]), min(200_000, len(iu[0])), replace=False)
            pair_corr = np.corrcoef((s @ s.T)[iu][pick], (t @ t.T)[iu][pick])[0, 1]
            row[name] = {"cosine": float(cos.mean()), "distill": float(np.mean(2 - 2 * cos)),
                         "pair_corr": float(pair_corr)}
            if name == "held_out":
                row["accuracy"] = score(s)["accuracy"]
        fits.append(row)

    info = machine(threads)
    md = [f"`{command_line()}`", "", machine_line(info), "",
          f"{len(left)} held-out pairs (folds {cfg.val_folds}), {len(val)} images, one pass, cosine on centred "
          "teacher descriptors.", "",
          md_table(["teacher's input", "held-out acc. %", "AUC"],
                   [[c["input"], f"{100 * c['accuracy']:.2f} +- {100 * c['std']:.2f}", f"{c['auc']:.4f}"]
                    for c in ceiling])]
    if fits:
        md += ["", f"Student against teacher ({len(train)} training faces drawn at random, all held-out faces):", "",
               md_table(["weights", "cosine to teacher: train / held out", "distill loss: train / held out",
                         "pair-score correlation: train / held out", "held-out acc. %"],
                        [[f["weights"].rsplit("/", 1)[-1],
                          f"{f['train']['cosine']:.3f} / {f['held_out']['cosine']:.3f}",
                          f"{f['train']['distill']:.3f} / {f['held_out']['distill']:.3f}",
                          f"{f['train']['pair_corr']:.3f} / {f['held_out']['pair_corr']:.3f}",
                          f"{100 * f['accuracy']:.2f}"] for f in fits])]
    emit("distill-gap", "Where the student falls short of the teacher", "\n".join(md),
         {"machine": info, "ceiling": ceiling, "fits": fits}, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
