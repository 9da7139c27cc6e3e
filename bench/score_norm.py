"""How to turn two embeddings into one score: plain cosine against linear maps and cohort normalisations.

Every rule is fitted on training faces only (the held-out people of folds 7-8 are never seen) and judged on the
held-out faces: the protocol's 1,200 pairs (accuracy, threshold chosen on the other fold) and every pair among
the 2,585 held-out faces (ROC AUC, TAR at FAR 1e-2 / 1e-3 / 1e-4 over 21,878 genuine and 3.3 million impostor
pairs). Rows:

- cosine; cosine after centring on the training mean; after PCA whitening (eigenvalues^-p, shrinkage s);
- adaptive s-norm (AS-norm: each side z-normalised by the mean and std of its top-k cohort scores);
- the mean-only form (``model.score_norm.CohortNorm``, what the service uses) for several cohort sizes and k;
- the bundle's own scorer, as shipped; with --teacher the dlib teacher's centred descriptors, plain and mean-only.

    VISAGE_WORK_DIR=/work/cache python bench/score_norm.py --teacher --out docs/TRAINING.md
"""

from __future__ import annotations

import numpy as np
from common import (
    command_line,
    emit,
    held_out_scores,
    load_default_bundle,
    machine,
    machine_line,
    md_table,
    parser,
    progress,
)

from model.embedder import Embedder
from model.score_norm import CohortNorm
from training.config import load_config
from training.loop import load_split


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rules(train: np.ndarray, rng: np.random.Generator, quick: bool):
    """(name, function of held-out vectors -> score matrix) for every rule, all fitted on ``train``."""
    mu = train.mean(0)
    ev, vecs = np.linalg.eigh(np.cov((train - mu).T))
    yield "cosine", lambda v: v @ v.T
    yield "cosine, centred on the training mean", lambda v: unit(v - mu) @ unit(v - mu).T
    for p, shrink in [(0.25, 0.0), (0.5, 0.1)]:
        w = vecs @ np.diag((ev + shrink * ev.mean()) ** -p)
        yield f"PCA whitening p={p}, s={shrink}", lambda v, w=w: unit((v - mu) @ w) @ unit((v - mu) @ w).T
    cohort = train[np.sort(rng.choice(len(train), min(4096, len(train)), replace=False))]

    def as_norm(v: np.ndarray, k: int = 16) -> np.ndarray:
        top = np.sort(v @ cohort.T, axis=1)[:, -k:]
        m, sd = top.mean(1), top.std(1)
        raw = v @ v.T
        return 0.5 * ((raw - m[:, None]) / sd[:, None] + (raw - m[None]) / sd[None])

    yield f"AS-norm, cohort {len(cohort)}, k=16", as_norm
    for n, k in ([(4096, 16)] if quick else [(1024, 8), (2048, 16), (4096, 4), (4096, 16), (4096, 64), (None, 16)]):
        pick = np.sort(rng.choice(len(train), min(n or len(train), len(train)), replace=False))
        norm = CohortNorm(train[pick], k)
        yield f"mean-only (CohortNorm), cohort {len(pick)}, k={k}", lambda v, norm=norm: norm.matrix(v, v)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--weights", help="student bundle (default: the shipped one)")
    ap.add_argument("--teacher", action="store_true", help="also the dlib teacher's cached descriptors")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings over the bundle's recipe")
    args = ap.parse_args()
    info = machine()  # first: the machine's load, not this script's own work
    bundle, desc = load_default_bundle(args.weights)
    cfg = load_config(None, args.overrides, base=bundle.metadata.get("recipe"))
    split = load_split(cfg, need_teacher=args.teacher)
    labels = np.unique(split.val.identities, return_inverse=True)[1]
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    left, right = split.val_left, split.val_right
    n_train = 500 if args.quick else len(split.train.crops)  # --quick: a smoke test on the first 500
    train_faces = split.train.subset(np.arange(len(split.train.crops)) < n_train)
    progress(f"embedding {len(train_faces.crops)} training and {len(split.val.crops)} held-out faces")
    embedder = Embedder(bundle, flip=True)
    train, val = embedder.embed(train_faces.crops), embedder.embed(split.val.crops)
    rows, results = [], {}

    def add(who: str, name: str, full: np.ndarray) -> None:
        r = held_out_scores(full, iu, same, full[left, right], split.val_same, split.val_folds)
        results[f"{who}: {name}"] = r
        rows.append([who, name, f"{100 * r['accuracy']:.2f}", f"{r['auc']:.4f}",
                     *(f"{100 * r[f'tar_{f:g}']:.1f}" for f in (1e-2, 1e-3, 1e-4))])
        progress(f"{who}: {name}: {rows[-1][2:]}")

    for name, rule in rules(train, np.random.default_rng(0), args.quick):
        add("student", name, rule(val))
    add("student", f"the bundle's scorer ({bundle.scorer.tag})", bundle.scorer.matrix(val, val))
    if args.teacher:
        centre = np.concatenate([split.train.teacher, split.train.teacher_flip]).mean(0)
        t_train = unit(0.5 * (train_faces.teacher + train_faces.teacher_flip) - centre)
        t_val = unit(0.5 * (split.val.teacher + split.val.teacher_flip) - centre)
        add("dlib teacher", "cosine, centred descriptors", t_val @ t_val.T)
        norm = CohortNorm(t_train[np.sort(np.random.default_rng(0).choice(len(t_train), 4096, replace=False))]
                          if len(t_train) > 4096 else t_train, 16)
        add("dlib teacher", f"mean-only (CohortNorm), cohort {len(norm.cohort)}, k=16", norm.matrix(t_val, t_val))
    table = md_table(["network", "scoring rule (fitted on training faces)", "protocol acc. %", "all-pairs AUC",
                      "TAR @ 1e-2 %", "TAR @ 1e-3 %", "TAR @ 1e-4 %"], rows)
    markdown = "\n\n".join([f"`{command_line()}`", machine_line(info),
                            f"Student: {desc} ({bundle.model_version}); held-out folds {cfg.val_folds}, flip-averaged "
                            f"embeddings; {int(same.sum()):,} genuine and {int((~same).sum()):,} impostor pairs.",
                            table])
    emit("score_norm", "Scoring rules", markdown, {"machine": info, **results}, args)


if __name__ == "__main__":
    main()
