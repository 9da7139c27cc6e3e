"""``visage prepare``, ``teacher-embed``, ``train``, ``calibrate``, ``soup``, ``eval``: the training package's
subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.console import add_json_flag, positive_int, print_json, print_table
from model.files import check_writable
from training.prepare import DEFAULT_PAD

if TYPE_CHECKING:
    from model.bundle import Bundle
    from training.config import TrainConfig


def register(sub) -> None:
    p = sub.add_parser("prepare", help="align a folder-per-identity photo set into 112x112 crops + manifest",
                       description="SRC/<identity>/<image> -> DST/crops/... aligned with MTCNN's 5 landmarks, and "
                       "DST/manifest.csv with identity, source, detection score and failure reason. Resumable: "
                       "re-running skips finished images (failed ones too), and redoes those whose file changed "
                       "since. Exit status 1 when some images failed in this run (their manifest rows say why), "
                       "else 0.")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: one per core, at most 8)")
    p.add_argument("--pad", type=float, default=DEFAULT_PAD,
                   help=f"grey border added on each side, as a fraction of the image (0 to 1, default {DEFAULT_PAD}), "
                   "so tight crops give the detector context (0.28 turns a 160 px LFW crop back into its 250 px "
                   "frame)")
    add_json_flag(p)
    p.set_defaults(func=cmd_prepare, sigterm_interrupts=True)  # (model.console: from the start, as Ctrl-C)

    p = sub.add_parser("teacher-embed", help="compute and cache dlib teacher descriptors of 160x160 face crops",
                       description="dlib ResNet descriptors (plain and mirrored) of every image under FOLDER, "
                       "each a 160x160 face crop as in the shared LFW and CelebA sets (teacher/SOURCE.md: pasted "
                       "at (45, 45) on a 250x250 grey canvas; other sizes are listed as failed), "
                       "cached by image hash. Starts from the shipped reference descriptors, so only new images "
                       "cost time: dlib finds the face and landmarks, the descriptor network runs in PyTorch (about "
                       "60 ms an image for both views on these 2 cores). Needs the 'teacher' extra. Unreadable "
                       "images are listed and skipped (exit code 1); the cache is saved every minute while it works.")
    p.add_argument("folder", type=Path)
    p.add_argument("--cache", type=Path, default=None,
                   help="cache file (default: $VISAGE_WORK_DIR/teacher_cache.npz; the work dir defaults to data/work "
                   "in the repo)")
    add_json_flag(p)
    p.set_defaults(func=cmd_teacher_embed, sigterm_interrupts=True)

    p = sub.add_parser("train", help="train a face embedder (triplets + distillation)",
                       description="FaceNet-style training: P x K batches, online triplet mining and distillation "
                       "from dlib's descriptors. Settings come from the built-in defaults, then --config (TOML), then "
                       "KEY=VALUE overrides; every key, with its default and what it does, is a field of "
                       "TrainConfig in training/config.py (training/configs/default.toml is the shipped "
                       "recipe's first stage, not the list of keys). Use torchrun for several GPUs.")
    p.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. epochs=5 alpha=0.25 miner=semi_hard")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, metrics.jsonl, plots, bundle.pt")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--export", action="store_true",
                   help="do not train: turn RUN_DIR/last.pt into a calibrated bundle (RUN_DIR/bundle-epochN.pt)")
    p.set_defaults(func=cmd_train, sigterm_interrupts=True)

    p = sub.add_parser("calibrate", help="give a weights bundle its scoring cohort and calibrated thresholds",
                       description="Embeds a cohort of training faces (score_cohort of them; 0 = plain cosine) "
                       "and calibrates the FAR 1e-2/1e-3/1e-4 thresholds on every impostor pair among the held-out "
                       "faces, as the end of `visage train` does; writes the result to --out. Every face is "
                       "embedded with the test-time views set by test_time_shift (3: the crop and four copies "
                       "shifted 3 px; 0: the crop alone; default: the bundle's own, 0 for bundles made before "
                       "session 9), which the bundle then serves, and which are part of its model version. "
                       "Settings (data, held-out folds, score_cohort, score_k) come from the recipe recorded in "
                       "the bundle, then --config, then KEY=VALUE overrides.")
    p.add_argument("--weights", required=True, type=Path, help="the bundle to calibrate")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. score_cohort=4096 score_k=16 test_time_shift=0")
    _calibration_options(p, cmd_calibrate)

    p = sub.add_parser("soup", help="average several fine-tunes of one network into one calibrated bundle",
                       description="A uniform model soup: every weight and batch-norm statistic averaged over the "
                       "bundles (fine-tunes from the same starting weights), then calibrated as `visage calibrate` "
                       "does (scoring cohort + FAR thresholds, settings from the first bundle's recipe).")
    p.add_argument("weights", nargs="+", type=Path, help="two or more bundles of the same network")
    p.add_argument("--set", dest="overrides", action="extend", nargs=1, default=[], metavar="KEY=VALUE",
                   help="a setting over the recipe, once per setting, e.g. --set score_cohort=4096 --set score_k=16")
    _calibration_options(p, cmd_soup)

    p = sub.add_parser("eval", help="LFW-protocol verification accuracy on a pairs file",
                       description="n-fold verification accuracy (threshold chosen on the other folds), TAR at "
                       "FAR 1e-3 and 1e-2, ROC AUC and a ROC curve PNG, on any pairs file in LFW format.")
    p.add_argument("--pairs", type=Path, required=True, help="pairs file in LFW format (header: folds, n)")
    p.add_argument("--images", type=Path, required=True, help="folder with <Name>/<Name>_NNNN.jpg")
    p.add_argument("--weights", help="student weights bundle (default: the shipped bundle)")
    p.add_argument("--teacher", choices=["dlib"], help="evaluate the dlib teacher instead of the student")
    p.add_argument("--folds", help="comma-separated 1-based folds to use, at least two (each fold's threshold is "
                   "chosen on the others; default: all)")
    p.add_argument("--no-flip", action="store_true",
                   help="no mirror averaging of the test faces (the bundle's cohort stays mirror-averaged, as served)")
    p.add_argument("--prepared", type=Path,
                   help="aligned crops from `visage prepare` (default: the pairs' images are aligned once and cached "
                   "under the work dir)")
    p.add_argument("--roc", type=Path, default=Path("roc.png"),
                   help="where to write the ROC curve, a PNG (default roc.png in the current folder; a folder: "
                   "roc.png in it)")
    add_json_flag(p)
    p.set_defaults(func=cmd_eval, sigterm_interrupts=True)


def _calibration_options(p: argparse.ArgumentParser, func) -> None:
    """What `calibrate` and `soup` share: where to write, the settings file over the recorded recipe, --json."""
    p.add_argument("--out", required=True, type=Path, help="where to write the calibrated bundle")
    p.add_argument("--config", type=Path, help="TOML file overriding the (first) bundle's recorded recipe")
    add_json_flag(p)
    p.set_defaults(func=func)


def cmd_prepare(args: argparse.Namespace) -> int:
    from model.decode import IMAGE_SUFFIXES
    from training.prepare import prepare

    s = prepare(args.src, args.dst, workers=args.workers, pad=args.pad, progress=not args.json)
    # photos directly in SRC have no identity folder: not prepared, but said (they were passed over in silence)
    loose = sorted(f.name for f in args.src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        print(f"not read: {len(loose)} photos directly in {args.src} (e.g. {loose[0]}): each identity's photos go in "
              f"{args.src}/<identity>/", file=sys.stderr)
    if args.json:
        print_json({**dataclasses.asdict(s), "not_in_identity_folders": loose})
    else:
        print_table(f"prepared {args.src} -> {args.dst}", ["images", "already done", "detected", "fallback", "failed"],
                    [(s.total, s.done_before, s.detected, s.fallback, s.failed)], caption=f"manifest: {s.manifest}")
        if s.changed:
            print(f"{s.changed} images had changed since they were prepared: redone", file=sys.stderr)
        if s.failed_now:
            print(f"{s.failed_now} images failed: their rows in {s.manifest} have status 'failed' and say why",
                  file=sys.stderr)
    return 1 if s.failed_now else 0  # as enroll and teacher-embed: a script can tell a partial success


def cmd_teacher_embed(args: argparse.Namespace) -> int:
    from model.decode import IMAGE_SUFFIXES
    from training.paths import work_dir
    from training.teacher import teacher_embed

    if not args.folder.is_dir():
        raise FileNotFoundError(f"no such folder: {args.folder}")
    images = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:  # a mistyped folder must not end as "0 images, success" (with the whole reference cache written)
        raise FileNotFoundError(f"no images in {args.folder} (photos ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    cache_path = args.cache or work_dir() / "teacher_cache.npz"
    check_writable(cache_path, "--cache" if args.cache else "the teacher cache")  # not after minutes of dlib
    result = teacher_embed(images, cache_path, progress=not args.json)
    failed = result.failed
    out = {"images": len(images), "computed": result.computed,
           "cached": len(images) - result.computed - len(failed), "failed": len(failed),
           "no_face_fallbacks": result.fallbacks, "cache": str(cache_path), "cache_rows": len(result.cache.keys)}
    if args.json:
        print_json({**out, "failures": failed})
    else:
        print_table("dlib teacher descriptors", list(out), [list(out.values())],
                    caption="no_face_fallbacks: dlib found no face; described in the fixed central box, as the "
                    "shipped reference rows are")
        for path, reason in failed.items():
            print(f"failed: {path}: {reason}")
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.loop import export_checkpoint, train

    if args.export:
        if args.config or args.overrides or args.resume or args.max_steps:
            raise ValueError("--export turns RUN_DIR/last.pt into a bundle with the run's own settings: it takes "
                             "no --config, KEY=VALUE, --resume or --max-steps")
        print(f"weights bundle: {export_checkpoint(args.run_dir)}")
        return 0
    out = train(train_config(args), args.run_dir, resume=args.resume, max_steps=args.max_steps)
    print(f"weights bundle: {out}")
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """--config and KEY=VALUE over the defaults, or with --resume over the run's own settings: the built-in
    defaults under a forgotten --config silently changed a resumed run's recipe half-way."""
    from training.config import load_config
    from training.loop import RESUME_KEYS, load_checkpoint

    last = args.run_dir / "last.pt"
    base = load_checkpoint(last, RESUME_KEYS)["config"] if args.resume and last.is_file() else None
    return load_config(args.config, args.overrides, base=base)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from model.bundle import load_bundle

    bundle = load_bundle(args.weights, check_version=False)  # (it names the weights afresh)
    return _calibrate_and_save(bundle, args, f"calibrated {args.weights} -> {args.out}")


def cmd_soup(args: argparse.Namespace) -> int:
    from model.bundle import load_bundle
    from training.soup import average_bundles

    for path in args.weights:  # calibrate's way of giving settings: it was "weights file not found: score_cohort=8"
        if "=" in path.name and not path.exists():
            raise ValueError(f"{path} is not a weights file: settings go with --set: --set {path}")
    bundles = [load_bundle(w) for w in args.weights]
    for path, other in zip(args.weights[1:], bundles[1:], strict=True):  # named, in the command line's order
        if other.config != bundles[0].config:
            raise ValueError(f"cannot average {args.weights[0]} ({bundles[0].config}) with {path} ({other.config}): "
                             "a soup is of fine-tunes of one network")
    bundle = average_bundles(bundles)
    return _calibrate_and_save(bundle, args, f"soup of {len(args.weights)} -> {args.out}")


def _calibrate_and_save(bundle: Bundle, args: argparse.Namespace, title: str) -> int:
    """The scoring cohort and thresholds for ``bundle`` (settings: its recipe, --config, overrides), saved."""
    from model.bundle import save_bundle
    from training.config import load_config
    from training.loop import calibrate_bundle, load_split

    check_writable(args.out, "--out")  # now, not after the calibration's minutes of embedding
    recipe = bundle.metadata.get("recipe") or {}
    # the embedding stays as it is unless asked: a bundle's own views (none before session 9) over its recipe's
    cfg = load_config(args.config, args.overrides, base={**recipe, "test_time_shift": bundle.test_time_shift})
    if cfg.model != bundle.config:
        raise ValueError(f"the settings describe {cfg.model}, the weights are {bundle.config}")
    held_out = set(recipe.get("val_folds", []))
    if recipe and (cfg.pairs != recipe.get("pairs") or not set(cfg.val_folds) <= held_out):
        raise ValueError(f"these weights were trained with folds {sorted(held_out)} of {recipe.get('pairs')} held "
                         f"out; calibrating on folds {cfg.val_folds} of {cfg.pairs} could judge them on people they "
                         "were trained on")
    val = calibrate_bundle(bundle, cfg, load_split(cfg, need_teacher=False))
    bundle.metadata["validation"] = {"pairs_file": cfg.pairs, "folds": cfg.val_folds, **val}
    save_bundle(bundle, args.out)
    out = {"weights": str(args.out), "model_version": bundle.model_version, "scoring": val["scoring"],
           "thresholds": bundle.thresholds, "accuracy": val["accuracy"], "auc": val["auc"],
           "all_pairs": val["all_pairs"], "warnings": val["warnings"]}
    if args.json:
        print_json(out)
    else:
        rows = [("model version", bundle.model_version), ("scoring", out["scoring"]),
                ("held-out accuracy", f"{100 * val['accuracy']:.2f}%"), ("held-out AUC", f"{val['auc']:.4f}")]
        rows += [(f"threshold @ FAR {far}", f"{thr:.4f}") for far, thr in bundle.thresholds.items()]
        rows += [(f"all-pairs TAR @ FAR {k.removeprefix('tar_at_far_')}", f"{100 * v:.2f}%")
                 for k, v in val["all_pairs"].items() if k.startswith("tar_at_far_")]
        print_table(title, ["", "value"], rows)
    return 0


def _pair_images(pairs) -> list[str]:
    return sorted({p for pair in pairs for p in (pair.left, pair.right)})


def _student_scores(args, names: list[str]) -> tuple[dict[str, np.ndarray], int, Bundle]:
    from model.bundle import load_bundle
    from model.embedder import Embedder
    from training.data import load_prepared
    from training.paths import work_dir
    from training.prepare import prepare

    bundle = load_bundle(args.weights)  # (before any aligning: a wrong path fails at once)
    prepared = args.prepared
    if prepared is None:  # only the pairs' images: a few pairs of a 10,000-photo folder align in seconds
        key = hashlib.sha256(str(args.images.resolve()).encode()).hexdigest()[:12]
        prepared = work_dir() / "eval-cache" / key
        prepare(args.images, prepared, progress=not args.json, only=set(names))
    faces = load_prepared(prepared)
    where = {s: i for i, s in enumerate(faces.sources)}
    missing = [n for n in names if n not in where]
    if missing and args.prepared is None:  # the files are there (checked before): they could not be read
        raise ValueError(f"{len(missing)} pair image{'s' if len(missing) > 1 else ''} in {args.images} could not be "
                         f"read (e.g. {missing[0]}; "
                         f"the reasons are in {prepared / 'manifest.csv'})")
    if missing:
        raise ValueError(f"{len(missing)} pair images are missing from {prepared} (e.g. {missing[0]})")
    idx = np.array([where[n] for n in names])
    emb = Embedder(bundle, flip=not args.no_flip).embed(faces.crops[idx])
    return dict(zip(names, emb, strict=True)), int(faces.fallback[idx].sum()), bundle


def _teacher_scores(args, names: list[str]) -> tuple[dict[str, np.ndarray], int, None]:
    from training.paths import work_dir
    from training.teacher import teacher_vectors

    paths = [args.images / n for n in names]
    plain, mirrored = teacher_vectors(paths, work_dir() / "teacher_cache.npz", progress=not args.json)
    desc = plain if args.no_flip else 0.5 * (plain + mirrored)
    return dict(zip(names, desc, strict=True)), 0, None


def parse_folds(text: str, n_folds: int) -> set[int]:
    """``--folds 7,8`` -> {6, 7} (0-based), each checked against the pairs file's header."""
    from training.pairs import chosen_folds

    try:
        folds = {int(f) for f in text.split(",") if f.strip()}
    except ValueError:
        raise ValueError(f"--folds takes comma-separated fold numbers, e.g. 7,8; got {text!r}") from None
    return chosen_folds(folds, n_folds, "--folds")


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import check_figure_path, plot_roc, verify
    from training.pairs import chosen_folds, read_pairs

    if args.teacher and (args.weights or args.prepared):
        raise ValueError("--teacher dlib evaluates dlib's own network on its own chips: --weights and --prepared "
                         "are the student's options")
    if args.roc.is_dir():
        args.roc = args.roc / "roc.png"
    check_figure_path(args.roc)  # now, not after minutes of aligning and embedding
    try:
        n_folds, pairs = read_pairs(args.pairs)
    except OSError as exc:  # (a bare "[Errno 2] No such file or directory: 'x.txt'" named no option)
        raise type(exc)(f"--pairs {args.pairs}: {exc.strerror or exc}") from None
    if args.folds:
        wanted = parse_folds(args.folds, n_folds)
    else:
        wanted = chosen_folds(range(1, n_folds + 1), n_folds, "the pairs file's header")
    check_writable(args.roc, "--roc")  # a folder not made, a file in the way: now, not after the embedding
    pairs = [p for p in pairs if p.fold in wanted]
    if not pairs:
        raise ValueError(f"{args.pairs} has no pairs to evaluate")
    names = _pair_images(pairs)
    if args.prepared is None and not args.images.is_dir():
        raise FileNotFoundError(f"--images {args.images}: no such folder (the folder of the pairs' Name/Name_NNNN.jpg)")
    if args.prepared is None and (absent := [n for n in names if not (args.images / n).is_file()]):
        raise FileNotFoundError(f"{len(absent)} of the {len(names)} pair images are not in {args.images} "
                                f"(e.g. {absent[0]})")
    vectors, fallbacks, bundle = (_teacher_scores if args.teacher else _student_scores)(args, names)
    a = np.stack([vectors[p.left] for p in pairs])
    b = np.stack([vectors[p.right] for p in pairs])
    # dlib's descriptors are compared by Euclidean distance (its own rule); ours as the bundle scores them
    scores = -np.linalg.norm(a - b, axis=1) if bundle is None else bundle.scorer.pairs(a, b)
    from model.embedder import NO_FLIP

    version = ("dlib_resnet_v1" if bundle is None
               else bundle.model_version + (NO_FLIP if args.no_flip else ""))  # (as the Embedder names them)
    result = verify(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))
    roc = plot_roc({f"{version} (AUC {result.auc:.4f})": (result.fpr, result.tpr)}, args.roc,
                   f"{args.pairs.name}: {len(pairs)} pairs")
    impostors = sum(not p.same for p in pairs)
    # with fewer than 1/FAR impostor pairs no impostor may pass: the TAR is at the highest impostor's score
    warnings = [f"TAR @ FAR {far} rests on {impostors} impostor pairs, fewer than {round(1 / float(far))}: it is "
                "the TAR above the highest impostor score, a stricter point than that FAR"
                for far in result.tar_at_far if impostors * float(far) < 1]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = {**result.to_dict(), "model": version, "images": len(names), "detection_fallbacks": fallbacks,
           "impostor_pairs": impostors, "warnings": warnings,
           "metric": "negative euclidean distance" if bundle is None else bundle.scorer.tag, "roc_png": str(roc)}
    if args.json:
        print_json(out)
    else:
        print_table(f"verification on {args.pairs} ({version})", ["metric", "value"],
                    [("accuracy", f"{100 * out['accuracy']:.2f}% +- {100 * out['accuracy_std']:.2f}"),
                     ("TAR @ FAR 1e-3", f"{100 * out['tar_at_far_1e-3']:.2f}%"),
                     ("TAR @ FAR 1e-2", f"{100 * out['tar_at_far_1e-2']:.2f}%"),
                     ("ROC AUC", f"{out['auc']:.4f}"), ("threshold", f"{out['threshold']:.4f}"),
                     ("pairs", out["pairs"]), ("detection fallbacks", fallbacks), ("ROC curve", str(roc))])
    return 0
