"""Face detection + alignment time per photo by photo size, and MTCNN settings: speed against recall.

Table 1: ``obama4.jpg`` (1480x832) resized to 240p, 480p, 720p and 1080p, plus ``edge/obama_4000px.jpg``
(4000x2249), each through ``model.detect.FaceDetector().detect`` (default settings) and ``model.align.align_face``
for every face found; JPEG decoding (``model.decode.decode_image`` of the photo re-encoded at quality 90) is timed
separately, since the service pays it too.

Table 2: every combination of ``DetectorConfig(max_side=..., min_face_size=...)`` on the test photos (the six
single-person photos with 1 face each, ``multi/obama_and_biden.jpg`` 3, ``multi/two_people.jpg`` 2,
``multi/kit_with_rose.jpg`` 2, ``nonface/*`` 0): recall (faces found, up to the number expected, over faces
expected), photos whose count is exactly right, extra faces, and time per photo, so the fastest setting that keeps
recall can be chosen. All settings are timed interleaved (one pass over the photos per setting per round).

    python bench/detection.py --out docs/BENCHMARKS.md
    OMP_NUM_THREADS=1 python bench/detection.py --quick      # smoke test (< 1 minute)
"""

from __future__ import annotations

import io
import itertools
import sys
import time

import numpy as np
from common import (
    command_line,
    emit,
    interleaved,
    machine,
    machine_line,
    md_table,
    parser,
    photos_dir,
    progress,
    set_threads,
    stats,
)
from PIL import Image

from model.align import align_face
from model.decode import decode_image, read_image_file
from model.detect import DetectorConfig, FaceDetector

SIZES = {"240p": 240, "480p": 480, "720p": 720, "1080p": 1080}
EXPECTED = {
    "obama.jpg": 1,
    "obama2.jpg": 1,
    "obama3.jpg": 1,
    "obama4.jpg": 1,
    "biden.jpg": 1,
    "biden2.jpg": 1,
    "multi/obama_and_biden.jpg": 3,
    "multi/two_people.jpg": 2,
    "multi/kit_with_rose.jpg": 2,
    "nonface/chelsea_cat.jpg": 0,
    "nonface/coffee.jpg": 0,
    "nonface/hubble_deep_field.jpg": 0,
    "nonface/rocket.jpg": 0,
}


def sized_photos() -> dict[str, tuple[Image.Image, bytes]]:
    """name -> (decoded RGB image, its JPEG bytes at quality 90)."""
    base = read_image_file(str(photos_dir() / "obama4.jpg"))
    out = {}
    for name, height in SIZES.items():
        width = round(base.width * height / base.height)
        img = base.resize((width, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[f"{name} ({width}x{height})"] = (img, buf.getvalue())
    big_bytes = (photos_dir() / "edge" / "obama_4000px.jpg").read_bytes()
    big = decode_image(big_bytes)
    out[f"4000px ({big.width}x{big.height})"] = (big, big_bytes)
    return out


def detect_and_align(detector: FaceDetector, image: Image.Image) -> int:
    faces = detector.detect(image)
    for f in faces:
        align_face(image, f.landmarks)
    return len(faces)


def size_table(args) -> tuple[list[dict], str]:
    photos = sized_photos()
    detector = FaceDetector()
    fns = {}
    for name, (img, data) in photos.items():
        faces = detector.detect(img)
        fns[f"detect+align {name}"] = lambda img=img: detect_and_align(detector, img)
        fns[f"align {name}"] = lambda img=img, faces=faces: [align_face(img, f.landmarks) for f in faces]
        fns[f"decode {name}"] = lambda data=data: decode_image(data)
    progress(f"sizes: timing {len(photos)} photo sizes (decode, detect, detect+align), interleaved")
    samples = interleaved(
        fns,
        warmup=args.warmup,
        min_rounds=args.min_rounds,
        max_rounds=args.rounds,
        budget_s=args.seconds,
        label="sizes",
    )
    rows = []
    for name, (img, _) in photos.items():
        rows.append(
            {
                "photo": name,
                "pixels": img.width * img.height,
                "faces": len(detector.detect(img)),
                "decode": stats(samples[f"decode {name}"]),
                "detect_align": stats(samples[f"detect+align {name}"]),
                "align": stats(samples[f"align {name}"]),
            }
        )
    table = md_table(
        ["photo", "Mpx", "faces", "detect+align ms (median)", "p90", "of which align ms", "JPEG decode ms"],
        [
            [
                r["photo"],
                r["pixels"] / 1e6,
                r["faces"],
                r["detect_align"]["median"],
                r["detect_align"]["p90"],
                r["align"]["median"],
                r["decode"]["median"],
            ]
            for r in rows
        ],
    )
    return rows, table


def settings_table(args) -> tuple[list[dict], str, str]:
    photos = {rel: read_image_file(str(photos_dir() / rel)) for rel in EXPECTED}
    big = photos_dir() / "edge" / "obama_4000px.jpg"
    timed_big = read_image_file(str(big))
    configs = list(itertools.product(args.max_side, args.min_face_size))
    detectors = {c: FaceDetector(DetectorConfig(max_side=c[0], min_face_size=c[1])) for c in configs}
    rows = []
    for (max_side, min_face), det in detectors.items():
        found = {rel: len(det.detect(img)) for rel, img in photos.items()}
        expected_faces = sum(EXPECTED.values())
        hit = sum(min(found[r], EXPECTED[r]) for r in EXPECTED)
        rows.append(
            {
                "max_side": max_side,
                "min_face_size": min_face,
                "recall": hit / expected_faces,
                "exact_photos": sum(found[r] == EXPECTED[r] for r in EXPECTED),
                "extra_faces": sum(max(0, found[r] - EXPECTED[r]) for r in EXPECTED),
                "found": found,
            }
        )
    progress(f"settings: timing {len(configs)} settings over {len(photos)} photos (+ the 4000 px one), interleaved")

    def pass_over(det):
        return lambda: [det.detect(img) for img in photos.values()]

    fns = {c: pass_over(d) for c, d in detectors.items()}
    fns.update({("big", c): (lambda d=d: d.detect(timed_big)) for c, d in detectors.items()})
    samples = interleaved(
        {str(k): f for k, f in fns.items()},
        warmup=1,
        min_rounds=args.min_rounds,
        max_rounds=args.rounds,
        budget_s=args.seconds,
        label="settings",
    )
    for row, c in zip(rows, configs, strict=True):
        row["ms_per_photo"] = stats(np.asarray(samples[str(c)]) / len(photos))
        row["ms_4000px"] = stats(samples[str(("big", c))])
    best_recall = max(r["recall"] for r in rows)
    keep = [r for r in rows if r["recall"] == best_recall]
    fastest = min(keep, key=lambda r: r["ms_per_photo"]["median"])
    default = DetectorConfig()
    table = md_table(
        [
            "max_side",
            "min_face_size",
            "recall",
            f"photos with the right count (of {len(EXPECTED)})",
            "extra faces",
            "ms/photo (median)",
            "ms on the 4000 px photo",
        ],
        [
            [
                f"{r['max_side']}{' (default)' if r['max_side'] == default.max_side else ''}",
                f"{r['min_face_size']}{' (default)' if r['min_face_size'] == default.min_face_size else ''}",
                f"{r['recall']:.3f}",
                r["exact_photos"],
                r["extra_faces"],
                r["ms_per_photo"]["median"],
                r["ms_4000px"]["median"],
            ]
            for r in rows
        ],
    )
    base = next(
        (r for r in rows if (r["max_side"], r["min_face_size"]) == (default.max_side, default.min_face_size)), None
    )
    verdict = (
        f"Fastest setting with the best recall ({best_recall:.3f}): max_side={fastest['max_side']}, "
        f"min_face_size={fastest['min_face_size']}, {fastest['ms_per_photo']['median']:.0f} ms/photo"
    )
    if base is not None:
        verdict += (
            f", {base['ms_per_photo']['median'] / fastest['ms_per_photo']['median']:.2f}x faster than the default "
            f"(max_side={default.max_side}, min_face_size={default.min_face_size}, recall {base['recall']:.3f})"
        )
    misses = []
    for r in rows:
        wrong = [f"{k} {v}/{EXPECTED[k]}" for k, v in r["found"].items() if v != EXPECTED[k]]
        misses.append(f"- {r['max_side']}/{r['min_face_size']}: {', '.join(wrong) or 'all right'}")
    detail = "Wrong counts per setting (max_side/min_face_size: photo found/expected):\n" + "\n".join(misses)
    return rows, table, verdict + ".\n\n" + detail


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--max-side", type=int, nargs="+", default=[640, 960, 1280], help="default: 640 960 1280")
    ap.add_argument("--min-face-size", type=int, nargs="+", default=[20, 40, 80], help="default: 20 40 80")
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget of each timing loop (default 60)")
    ap.add_argument("--rounds", type=int, default=30, help="most rounds of each timing loop (default 30)")
    ap.add_argument("--min-rounds", type=int, default=5, help="fewest rounds of each timing loop (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    ap.add_argument("--no-sizes", action="store_true", help="skip table 1 (time by photo size)")
    ap.add_argument("--no-settings", action="store_true", help="skip table 2 (MTCNN settings)")
    args = ap.parse_args()
    if args.quick:
        args.max_side, args.min_face_size = [640, 1280], [20, 80]
        args.seconds, args.rounds, args.min_rounds, args.warmup = 2.0, 2, 1, 1
    info = machine(set_threads(args.threads))
    started = time.perf_counter()
    results: dict = {"machine": info}
    parts = [f"`{command_line()}`", machine_line(info)]
    if not args.no_sizes:
        rows, table = size_table(args)
        results["sizes"] = rows
        parts += [
            "### Detection + alignment by photo size (default DetectorConfig)",
            "obama4.jpg (1480x832) resized with Lanczos (1080p is an upscale); 4000px = edge/obama_4000px.jpg. "
            "MTCNN runs on a copy downscaled to "
            f"max_side={DetectorConfig().max_side}; alignment crops from the full-size photo.",
            table,
        ]
    if not args.no_settings:
        rows, table, verdict = settings_table(args)
        results["settings"] = rows
        parts += [
            "### MTCNN settings: recall and time on the test photos",
            f"{len(EXPECTED)} photos at their own sizes ({sum(EXPECTED.values())} faces). Recall counts faces "
            "found up to the number expected per photo (a detector that finds the child in obama_and_biden.jpg "
            "gets 3/3).",
            table,
            verdict,
        ]
    results["seconds"] = time.perf_counter() - started
    emit("detection", "Detection + alignment per photo", "\n\n".join(parts), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
