"""Where the student falls short of its teacher, on the held-out LFW folds (training's own split):

1. The input ceiling: dlib's network (the teacher) on its own 150 px chip, and on only what the student gets: the
   student's aligned view at each input size, warped back into the chip frame (grey where the student's crop
   ends). If the teacher stays accurate on the student's view, the student's input holds what it needs and the
   gap is in the student's network and training.
2. The fit: for each weights bundle, how close the student's embedding is to the teacher's (centred, unit
   length: the training target) on training faces and on held-out faces, how well it reproduces the teacher's
   pair scores, and its held-out accuracy. A train/held-out difference is a generalisation gap, not capacity.
3. The errors: which held-out protocol pairs each network gets wrong (the protocol's verdicts: each fold's
   threshold chosen on the others), split by head pose (the larger yaw of the two faces, from prepare's 5
   landmarks; equal-count bins) and by matched / mismatched, and with ``--figure`` a picture of the pairs the
   first student gets wrong and the teacher right.

Views are un-augmented, one pass (no mirror averaging), cosine on centred teacher descriptors. Needs the
teacher extra and prepared folders with landmarks (``visage prepare`` since session 3).

    VISAGE_WORK_DIR=/work/cache python bench/distill_gap.py --out docs/TRAINING.md \\
        --weights model/weights/visage-mobilenet_v1-a0.5-r112.pt OTHER_BUNDLE.pt
"""

from __future__ import annotations

import numpy as np
import torch
from common import command_line, emit, machine, machine_line, md_table, parser, progress, set_threads

from model.bundle import load_bundle
from model.embedder import Embedder
from training.config import load_config
from training.data import Augment
from training.evaluate import protocol_verdicts, verify
from training.loop import load_split, load_teacher_net, load_views
from training.views import ViewAugment, student_view_as_chip

STILL = ViewAugment(Augment(flip=0, max_shift=0, max_scale=0, max_rotate_deg=0, colour=0, grey=0))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def yaw(landmarks: np.ndarray) -> np.ndarray:
    """|nose offset from the eyes' midpoint along the eye line| / eye distance: 0 frontal, ~0.5 near profile.
    NaN where prepare found no face (centred-region fallback, no landmarks)."""
    left, right, nose = landmarks[:, 0], landmarks[:, 1], landmarks[:, 2]
    axis = right - left
    dist = np.linalg.norm(axis, axis=1)
    return np.abs(np.sum((nose - (left + right) / 2) * axis, axis=1)) / dist**2


def errors_by_pose(pose: np.ndarray, same: np.ndarray, wrong: dict[str, np.ndarray]) -> list[dict]:
    """Error rate of each network per pose quartile of the pairs (and for pairs with a fallback face)."""
    known = ~np.isnan(pose)
    edges = np.quantile(pose[known], [0, 0.25, 0.5, 0.75, 1.0])
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = known & (pose >= lo) & (pose <= hi if hi == edges[-1] else pose < hi)
        rows.append({"pose": f"{lo:.2f}-{hi:.2f}", "pairs": int(sel.sum()), "matched": int(same[sel].sum()),
                     **{k: float(w[sel].mean()) for k, w in wrong.items()}})
    if (~known).any():
        rows.append({"pose": "fallback face", "pairs": int((~known).sum()), "matched": int(same[~known].sum()),
                     **{k: float(w[~known].mean()) for k, w in wrong.items()}})
    return rows


def failure_figure(path, crops, left, right, same, student, teacher, verdict_thr, limit: int = 12) -> int:
    """Contact sheet of the pairs the student gets wrong and the teacher right, worst student margin first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.nonzero(((student > verdict_thr[0]) != same) & ((teacher > verdict_thr[1]) == same))[0]
    idx = idx[np.argsort(-np.abs(student[idx] - verdict_thr[0]))][:limit]
    cols = 4
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        ax.imshow(np.concatenate([crops[left[i]], crops[right[i]]], axis=1))
        ax.set_title(f"{'same' if same[i] else 'different'}: student {student[i]:.2f}, teacher {teacher[i]:.2f}",
                     fontsize=7)
    fig.suptitle(f"student wrong, teacher right (thresholds {verdict_thr[0]:.2f} / {verdict_thr[1]:.2f})",
                 fontsize=9)
    fig.tight_layout()
    jpeg = str(path).lower().endswith((".jpg", ".jpeg"))  # photos: a JPEG is a fifth of the PNG
    fig.savefig(path, pil_kwargs={"quality": 85} if jpeg else None)
    plt.close(fig)
    return len(idx)


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
    ap.add_argument("--figure", default=None, metavar="FILE",
                    help="also draw the held-out pairs the first --weights gets wrong and the teacher right "
                         "(.png or .jpg)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    info = machine(threads)  # first: the machine's load, not this script's own work
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

    def pair_scores(emb: np.ndarray) -> np.ndarray:
        return np.sum(emb[left] * emb[right], axis=1)

    def score(emb: np.ndarray) -> dict:
        return verify(pair_scores(emb), same, folds).to_dict()

    progress(f"teacher on {len(val)} held-out faces: chip, then student views at {args.resolutions}")
    views, net = load_views(cfg, val, progress=False), load_teacher_net(torch.device("cpu"))
    ceiling, teacher_scores = [], None
    for res in [None, *args.resolutions]:
        emb = unit(teacher_on_views(views, len(val), net, res) - centre)
        if res is None:
            teacher_scores = pair_scores(emb)
        r = score(emb)
        ceiling.append({"input": "teacher's own 150 px chip" if res is None else f"student's view, {res} px",
                        "resolution": res, "accuracy": r["accuracy"], "std": r["accuracy_std"], "auc": r["auc"]})

    rng = np.random.default_rng(0)
    train = split.train.subset(np.isin(np.arange(len(split.train)),
                                       rng.choice(len(split.train), len(val), replace=False)))
    fits, student_scores = [], []
    for w in args.weights:
        progress(f"{w}: embedding {len(train)} training and {len(val)} held-out faces")
        emb = Embedder(load_bundle(w), flip=False, views=False)  # one pass, as the teacher is asked
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
                student_scores.append(pair_scores(s))
        fits.append(row)

    wrong = {"teacher": protocol_verdicts(teacher_scores, same, folds) != same}
    for f, sc in zip(fits, student_scores, strict=True):
        wrong[f["weights"]] = protocol_verdicts(sc, same, folds) != same
    pose = np.maximum(yaw(val.landmarks[left]), yaw(val.landmarks[right]))
    by_pose = errors_by_pose(pose, same, wrong)
    by_kind = [{"pairs": kind, **{k: float(w[same == flag].mean()) for k, w in wrong.items()}}
               for kind, flag in (("matched (missed)", True), ("mismatched (falsely accepted)", False))]
    if args.figure and student_scores:
        thr = (verify(student_scores[0], same, folds).threshold, verify(teacher_scores, same, folds).threshold)
        shown = failure_figure(args.figure, val.crops, left, right, same, student_scores[0], teacher_scores, thr)
        progress(f"wrote {args.figure} ({shown} pairs)")

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
    names = ["teacher (chip)"] + [f["weights"].rsplit("/", 1)[-1] for f in fits]
    md += ["", "Protocol errors (% of pairs) by head pose, the larger yaw of the two faces (equal-count bins):", "",
           md_table(["yaw", "pairs (matched)", *names],
                    [[r["pose"], f"{r['pairs']} ({r['matched']})", *(f"{100 * r[k]:.1f}" for k in wrong)]
                     for r in by_pose]),
           "", md_table(["errors %", *names], [[r["pairs"], *(f"{100 * r[k]:.1f}" for k in wrong)] for r in by_kind])]
    emit("distill-gap", "Where the student falls short of the teacher", "\n".join(md),
         {"machine": info, "ceiling": ceiling, "fits": fits, "errors_by_pose": by_pose, "errors_by_kind": by_kind},
         args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
