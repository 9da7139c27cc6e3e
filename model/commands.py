"""``visage cost``, ``visage embed``, ``visage compare``: the model package's subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from model.console import add_json_flag, decimal, error_code, print_json, print_table


def register(sub) -> None:
    p = sub.add_parser(
        "cost",
        help="per-layer mult-adds and parameters of MobileNet v1",
        description="Mult-adds and parameters per layer, computed from the paper's layer table. With "
        "--head imagenet at 224 px this reproduces the MobileNet paper (569M mult-adds, 4.2M params at alpha 1).",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier in (0, 1] (default 1.0)")
    p.add_argument("--resolution", type=int, default=224, help="input size in pixels (default 224)")
    p.add_argument("--head", choices=["imagenet", "embedding", "none"], default="imagenet",
                   help="imagenet: 1000-class FC as in the paper (default); embedding: the face head "
                   "(--embedding-dim, 128-d by default); none: the backbone alone")
    p.add_argument("--embedding-dim", type=int, default=128,
                   help="size of the embedding with --head embedding, 8 to 4096 (default 128)")
    p.add_argument("--standard-conv", action="store_true",
                   help="price the full-convolution baseline (each separable block as one 3x3 conv)")
    add_json_flag(p)
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("embed", help="detect, align and embed every face in images",
                       description="Detect every face, align it to the 112x112 template and print its embedding.",
                       epilog="Exit status: 0 when every image was read (an image without a face is not an error: it "
                       "lists no faces), 1 when some could not be (each listed with its error; the others are "
                       "embedded), 2 for bad arguments or weights.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--weights", help="weights bundle (default: the shipped model/weights bundle)")
    p.add_argument("--no-flip", action="store_true", help="skip mirror averaging (faster, slightly less accurate)")
    add_json_flag(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("compare", help="are two photos the same person?",
                       description="The score of the largest face in each image (the weights' own: cosine minus the "
                       "faces' cohort offsets, model/score_norm.py) against the weights' calibrated threshold "
                       "(FAR 1e-3 unless --far or --threshold is given).",
                       epilog="Exit status: 0 when both photos were compared, whatever the verdict (read it from the "
                       "output, or 'match' with --json); 2 when a photo cannot be read or has no face.")
    p.add_argument("image1", type=Path)
    p.add_argument("image2", type=Path)
    p.add_argument("--weights", help="weights bundle (default: the shipped bundle)")
    p.add_argument("--far", default="1e-3",
                   help="operating point: the false accept rate whose calibrated threshold to use, one of those "
                   "in the weights (the shipped ones: 1e-2, 1e-3, 1e-4; default 1e-3)")
    p.add_argument("--threshold", type=decimal, help="explicit score threshold in [-2, 2] (overrides --far)")
    add_json_flag(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export the embedding network to ONNX",
                       description="Write the weights' network as an ONNX model (dynamic batch) for ONNX Runtime "
                       "or other runtimes. Input: aligned 112x112 RGB crops, normalised as (pixel - 127.5) / 128, "
                       "NCHW; output: L2-normalised embeddings of that one view. Visage itself serves more: each "
                       "face is the mean of the crop, its mirror image and the bundle's shifted copies "
                       "(model/tta.py), scored against the bundle's cohort (model/score_norm.py); the calibrated "
                       "thresholds hold for those scores, not for plain cosines of this graph's output.")
    p.add_argument("--onnx", type=Path, required=True, metavar="PATH", help="where to write the .onnx file")
    p.add_argument("--weights", help="weights bundle (default: the shipped bundle)")
    add_json_flag(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from model.bundle import load_bundle
    from model.export import export_onnx

    bundle = load_bundle(args.weights)
    path = export_onnx(bundle, args.onnx)
    out = {"onnx": str(path), "bytes": path.stat().st_size, "model_version": bundle.model_version,
           "input": f"x: (N, 3, {bundle.config.resolution}, {bundle.config.resolution}) float32, (pixel - 127.5) / 128",
           "output": f"embedding: (N, {bundle.config.embedding_dim}) unit vectors"}
    if args.json:
        print_json(out)
    else:
        print_table("ONNX export", ["key", "value"], list(out.items()))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from model.cost import mobilenet_v1_cost

    if args.head == "embedding" and not 8 <= args.embedding_dim <= 4096:
        raise ValueError(f"--embedding-dim must be from 8 to 4096, got {args.embedding_dim}")
    report = mobilenet_v1_cost(args.alpha, args.resolution, args.head, args.standard_conv,
                               embedding_dim=args.embedding_dim)
    if args.json:
        print_json(report.to_dict())
        return 0
    rows = [(lc.name, lc.kind, f"{lc.input_size}x{lc.input_size}x{lc.in_channels}",
             f"{lc.kernel}x{lc.kernel}/s{lc.stride}", f"{lc.output_size}x{lc.output_size}x{lc.out_channels}",
             lc.mult_adds, lc.params) for lc in report.layers]
    rows.append(("total", "", "", "", "", report.mult_adds, report.params))
    kind = "full convolution" if args.standard_conv else "depthwise separable"
    print_table(f"MobileNet v1 ({kind}), alpha {args.alpha}, {args.resolution} px, {args.head} head",
                ["layer", "type", "input", "kernel", "output", "mult-adds", "params"], rows,
                caption=f"{report.mult_adds / 1e6:.1f}M mult-adds, {report.params / 1e6:.2f}M params "
                f"(+{report.bn_params:,} batch-norm)")
    return 0


def _read(path: Path) -> bytes:
    from model.decode import read_limited

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not path.exists():  # (not is_file: a pipe, /dev/stdin or <(curl ...), is read like a file, within the limit)
        raise FileNotFoundError(f"no such file: {path}")
    return read_limited(path)


def cmd_embed(args: argparse.Namespace) -> int:
    from model.errors import VisageError
    from model.faces import load_pipeline

    pipe = load_pipeline(args.weights, flip=not args.no_flip)
    results, rows, failed = [], [], 0
    for path in args.images:
        try:
            faces = pipe.faces(_read(path))
            results.append({"image": str(path), "faces": [
                {**f.summary(), "embedding": np.round(f.embedding, 6).tolist()} for f in faces]})
            for i, f in enumerate(faces):
                rows.append((str(path), i, f"{f.size:.0f}px", f"{f.quality:.2f}",
                             " ".join(f"{v:+.3f}" for v in f.embedding[:4]) + " ..."))
            if not faces:
                rows.append((str(path), "-", "no face found", "", ""))
        except (VisageError, OSError) as exc:
            failed += 1
            detail = getattr(exc, "detail", str(exc))
            code = exc.code if isinstance(exc, VisageError) else error_code(exc)
            results.append({"image": str(path), "error": code, "detail": detail})
            rows.append((str(path), "-", f"error: {detail}", "", ""))
    if args.json:
        print_json({"model_version": pipe.embedder.model_version, "dim": pipe.embedder.dim, "images": results})
    else:
        print_table(f"embeddings ({pipe.embedder.model_version})", ["image", "face", "size", "quality", "vector"], rows)
    return 1 if failed else 0  # as enroll and prepare: some images failed (listed), the rest are embedded


def cmd_compare(args: argparse.Namespace) -> int:
    from model.detect import choose_face
    from model.errors import VisageError
    from model.faces import load_pipeline

    if args.threshold is not None and not -2.0 <= args.threshold <= 2.0:  # (also refuses nan)
        raise ValueError(f"--threshold is a score in [-2, 2], got {args.threshold}")
    pipe = load_pipeline(args.weights)
    # before the photos: a --far the weights lack is refused at once, not after both are embedded (or hidden
    # behind a photo's error)
    threshold = args.threshold if args.threshold is not None else pipe.embedder.bundle.threshold(args.far)

    def largest(path: Path):
        try:
            return choose_face(pipe.faces(_read(path)), "largest")
        except VisageError as exc:
            raise exc.prefixed(str(path)) from None

    a, b = largest(args.image1), largest(args.image2)
    sim = pipe.embedder.bundle.scorer.score(a.embedding, b.embedding)
    bundle = pipe.embedder.bundle
    far = bundle.calibrated_far(args.far) if args.threshold is None and bundle.thresholds else None  # as /compare
    out = {"similarity": round(sim, 4), "threshold": round(threshold, 4), "far": far, "match": sim >= threshold,
           "model_version": pipe.embedder.model_version, "face1": a.summary(), "face2": b.summary()}
    if args.json:
        print_json(out)
    else:
        verdict = "SAME person" if out["match"] else "DIFFERENT people"
        print(f"{verdict}: score {sim:.3f} vs threshold {threshold:.3f} ({pipe.embedder.model_version})")
    return 0
