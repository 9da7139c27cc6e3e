"""Would averaging more views of each face at test time (zooms, shifts) buy accuracy, beyond the mirror the
service already averages, and at what cost in forward passes?

Every view is a small similarity warp of the aligned 112 px crop (scale about the centre, shift in pixels; edges
filled mid-grey, as the training views and the served shifts of ``model/tta.py`` are), embedded with the mirror;
a combination averages its views' vectors and renormalises. The network is run without the bundle's own
test-time views (``Embedder(views=False)``), so every row is built here; the bundle's scorer (its cohort embedded
as the bundle serves) judges them all. Judged like bench/score_norm.py on the held-out people of folds
7-8 (training's own split): protocol accuracy on their 1,200 pairs, ROC AUC and TAR at FAR 1e-2 / 1e-3 / 1e-4 over
every pair of their 2,585 faces, scored with the bundle's own scorer (cohort from training faces, embedded as the
bundle serves).

    VISAGE_WORK_DIR=/work/cache python bench/test_time_views.py --out docs/TRAINING.md
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
from PIL import Image

from model.embedder import Embedder
from model.tta import view_count
from training.config import load_config
from training.loop import load_split

# name -> (scale, dx, dy): scale > 1 zooms in; shifts in aligned-crop pixels
VIEWS = {"as aligned": (1.0, 0, 0), "zoom in 6 %": (1.06, 0, 0), "zoom out 6 %": (0.94, 0, 0),
         "right 3 px": (1.0, 3, 0), "left 3 px": (1.0, -3, 0), "down 3 px": (1.0, 0, 3), "up 3 px": (1.0, 0, -3)}
COMBOS = {"aligned + both zooms": ["as aligned", "zoom in 6 %", "zoom out 6 %"],
          "aligned + four shifts": ["as aligned", "right 3 px", "left 3 px", "down 3 px", "up 3 px"],
          "all seven": list(VIEWS)}


GREY = (128, 128, 128)  # ~0 after crops_to_tensor: the edge model/tta.py's shifts leave


def warp(crops: np.ndarray, scale: float, dx: float, dy: float) -> np.ndarray:
    """Each crop seen ``scale`` times larger about its centre and moved by (dx, dy) pixels."""
    if (scale, dx, dy) == (1.0, 0, 0):
        return crops
    size = crops.shape[1]
    c = (size - 1) / 2
    # PIL's affine maps each output pixel to the input pixel it samples
    coeffs = (1 / scale, 0.0, c - (c + dx) / scale, 0.0, 1 / scale, c - (c + dy) / scale)
    return np.stack([np.asarray(Image.fromarray(x).transform((size, size), Image.Transform.AFFINE, coeffs,
                                                             resample=Image.Resampling.BILINEAR, fillcolor=GREY))
                     for x in crops])


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--weights", help="weights bundle (default: the shipped one)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings over the bundle's recipe")
    args = ap.parse_args()
    info = machine()  # first: the machine's load, not this script's own work

    bundle, source = load_default_bundle(args.weights)
    # the bundle's own held-out people (its recipe names them), as bench/score_norm.py does
    split = load_split(load_config(None, args.overrides, base=bundle.metadata.get("recipe")), need_teacher=False)
    crops = split.val.crops[:300] if args.quick else split.val.crops
    embedder = Embedder(bundle, views=False)
    served = bundle.test_time_shift
    vectors = {}
    for name, view in VIEWS.items():
        progress(f"embedding {len(crops)} held-out faces, view '{name}'")
        vectors[name] = embedder.embed(warp(crops, *view))
    labels = np.array(split.val.identities[: len(crops)])
    iu = np.triu_indices(len(crops), 1)
    same = labels[iu[0]] == labels[iu[1]]
    keep = (split.val_left < len(crops)) & (split.val_right < len(crops))

    def judge(name: str, members: list[str]) -> dict[str, object]:
        v = sum(vectors[m] for m in members)
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        full = bundle.scorer.matrix(v, v)
        pairs = full[split.val_left[keep], split.val_right[keep]]
        return {"name": name, "views": len(members), "passes": 2 * len(members),
                **held_out_scores(full, iu, same, pairs, split.val_same[keep], split.val_folds[keep])}

    results = [judge(name, [name]) for name in VIEWS] + [judge(name, m) for name, m in COMBOS.items()]
    rows = [[r["name"], r["passes"],
             f"{100 * r['accuracy']:.2f}", f"{r['auc']:.4f}",
             *(f"{100 * r[f'tar_{far:g}']:.1f}" for far in (1e-2, 1e-3, 1e-4))] for r in results]
    md = [f"`{command_line()}`", "", machine_line(info), "",
          f"{source}; {len(crops)} held-out faces (folds 7-8), {int(keep.sum())} protocol pairs, "
          f"{int(same.sum()):,} genuine / {int((~same).sum()):,} impostor pairs among them; "
          f"every view mirror-averaged. The bundle serves {view_count(served)} view(s) "
          f"(model/tta.py: shift {served} px; 'aligned + four shifts' when 3).",
          "", md_table(["views", "forward passes a face", "protocol acc. %", "all-pairs AUC", "TAR @ FAR 1e-2 %",
                        "TAR @ FAR 1e-3 %", "TAR @ FAR 1e-4 %"], rows)]
    emit("test-time-views", "Test-time views", "\n".join(md), {"machine": info, "results": results}, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
