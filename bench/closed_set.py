"""Closed-set identification on the small controlled sets (ORL: 40 people x 10; Yale: 15 people, lighting and
expression): rank-1 accuracy, leave-one-out, each image against every other, for the student (and the dlib
teacher with --teacher). Faces go through ``visage prepare`` (the same detection and alignment as serving).

    python bench/closed_set.py --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import numpy as np
from common import (
    command_line,
    emit,
    load_default_bundle,
    machine,
    machine_line,
    md_table,
    parser,
    shared_data,
    work_dir,
)

SETS = {"orl": "ORL / AT&T (40 x 10, 92x112 grey, controlled)", "yale": "Yale (15 people, lighting/expression)"}


QUICK_PEOPLE = 10  # --quick: the first ten people of each set


def rank1(sims: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out rank-1: each face's best-scoring other face has its label."""
    sims = np.array(sims, dtype=float)
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[np.argmax(sims, axis=1)] == labels))


def teacher_descriptors(teacher, paths: list) -> tuple[np.ndarray, int]:
    """dlib's flip-mean descriptors of whole photos (its own HOG detector and 5-point chips; the teacher cache
    holds only the shared data's 160 px crops), and how many photos it found no face in (the frame used)."""
    from PIL import Image

    out, fallbacks = [], 0
    for path in paths:
        with Image.open(path) as img:
            plain, mirrored, fallback = teacher.describe_photo(img)
        out.append(0.5 * (plain + mirrored))
        fallbacks += fallback
    return np.stack(out), fallbacks


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--weights", help="student bundle (default: the shipped one)")
    ap.add_argument("--teacher", action="store_true", help="also the dlib teacher (about 60 ms per image)")
    args = ap.parse_args()
    info = machine()  # first: the machine's load, not this script's own work
    from model.embedder import Embedder
    from training.data import load_prepared
    from training.prepare import prepare
    from training.teacher import DlibTeacher

    bundle, desc = load_default_bundle(args.weights)
    dlib = DlibTeacher() if args.teacher else None
    embedder = Embedder(bundle, backend="onnx")
    rows, results = [], {}
    for name, title in SETS.items():
        src = shared_data() / name / "images"
        summary = prepare(src, work_dir() / "prepared" / name, progress=False)
        faces = load_prepared(work_dir() / "prepared" / name)
        labels = np.unique(faces.identities, return_inverse=True)[1]
        keep = np.flatnonzero(labels < QUICK_PEOPLE) if args.quick else np.arange(len(labels))
        labels = labels[keep]
        emb = embedder.embed(faces.crops[keep])
        student = rank1(bundle.scorer.matrix(emb, emb), labels)  # scored as the service scores
        res = {"images": len(keep), "people": int(labels.max() + 1), "fallbacks": summary.fallback,
               "student_rank1": student}
        if args.teacher:
            teacher, res["teacher_fallbacks"] = teacher_descriptors(dlib, [src / faces.sources[i] for i in keep])
            # dlib's descriptors are compared by negative Euclidean distance, its own rule
            res["teacher_rank1"] = rank1(-np.linalg.norm(teacher[:, None] - teacher[None], axis=2), labels)
        results[name] = res
        rows.append([title, res["images"], res["people"], res["fallbacks"], f"{100 * student:.1f} %",
                     f"{100 * res['teacher_rank1']:.1f} % ({res['teacher_fallbacks']})" if args.teacher else "-"])
    table = md_table(["set", "images", "people", "detector fallbacks", "student rank-1",
                      "dlib teacher rank-1 (its detector's fallbacks)"], rows)
    markdown = "\n\n".join(
        [f"`{command_line()}`", machine_line(info), f"Student: {desc} ({bundle.model_version}).", table]
    )
    emit("closed_set", "Closed-set identification (ORL, Yale)", markdown, {"machine": info, **results}, args)


if __name__ == "__main__":
    main()
