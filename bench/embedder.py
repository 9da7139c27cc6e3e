"""Embedding throughput and latency per face on CPU, at batch 1 and batch 64, measured interleaved in one run.

Table 1 (models): the default MobileNet embedder (the shipped bundle, or a fresh ``ModelConfig()`` network when
there is none) through ``model.embedder.Embedder``, one pass and as served (the bundle's test-time views, each
with its mirror image: 10 passes a face for the shipped bundle), the alpha/resolution variants (random init),
facenet-pytorch's InceptionResnetV1 (random weights, never downloaded; 160 px input through the same
preprocessing) and dlib's ResNet descriptor, with mult-adds and parameters, and how many times
faster per face each is than InceptionResnetV1.

Table 2 (speed work): inference variants of the default network from ``bench/embedder_variants.py`` (fused
conv+BN, TorchScript, ONNX Runtime, bf16, int8 dynamic/static), each timed against the eager ``Embedder`` in the
same interleaved loop, with the agreement of its embeddings with the eager ones on 64 real aligned crops.

Every model is timed round-robin (one call of each per round), so load from other processes hits all of them
alike and the ratios stay meaningful; absolute ms need a quiet machine. Random-init networks get realistic
BatchNorm statistics first (``common.recalibrate_bn``) so their activations are not denormal.

    python bench/embedder.py                                  # full run (about 4-6 minutes on 2 cores)
    python bench/embedder.py --out docs/BENCHMARKS.md         # ... and write its section of the doc
    OMP_NUM_THREADS=1 python bench/embedder.py --quick        # smoke test (< 1 minute)
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    command_line,
    emit,
    interleaved,
    load_default_bundle,
    machine,
    machine_line,
    md_table,
    parser,
    progress,
    real_crops,
    recalibrate_bn,
    set_threads,
    shared_data,
    stats,
)
from embedder_variants import VARIANT_KEYS, VariantEmbedder, build_all

from model.bundle import bundle_from_model
from model.cost import mobilenet_v1_cost
from model.embedder import Embedder
from model.mobilenet import ModelConfig, build_model
from model.tta import view_count

ALPHAS = (0.25, 0.5, 0.75, 1.0)
RESOLUTIONS = (96, 128)


def count_macs(net: torch.nn.Module, resolution: int) -> int:
    """Mult-adds of one forward pass at batch 1, counted with hooks on Conv2d and Linear (as the paper counts)."""
    total = [0]

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    hooks = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.inference_mode():
        net.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return total[0]


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- the reference models ------------------------------------------------------------------------------------------


def inception_resnet(channels_last: bool):
    """facenet-pytorch's InceptionResnetV1 with random weights (``pretrained=None``: nothing is downloaded)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=False).eval()
    recalibrate_bn(net, 160, batches=1, batch_size=16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    return net, VariantEmbedder(net, 160, 512, channels_last=channels_last)


class DlibDescriptor:
    """dlib's ResNet face descriptor on real faces (LFW images, the teacher's method: 250x250 canvas, HOG detector,
    5-point shape). ``from_shape`` times ``compute_face_descriptor(image, shape)`` (dlib cuts the 150x150 chip from
    the 5 points, then runs the network); otherwise ``compute_face_descriptor(chip)`` on pre-aligned 150x150
    chips (the network alone)."""

    def __init__(self, n: int = 8) -> None:
        import dlib
        from PIL import Image

        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("dlib's model files need face_recognition_models (pip install 'visage[teacher]')")
        models = Path(list(spec.submodule_search_locations)[0]) / "models"
        self.rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        shape_predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        detector = dlib.get_frontal_face_detector()
        self.images, self.shapes, self.chips = [], [], []
        for path in sorted((shared_data() / "lfw" / "images").rglob("*.jpg"))[:200]:
            canvas = Image.new("RGB", (250, 250), (128, 128, 128))
            canvas.paste(Image.open(path).convert("RGB"), (45, 45))
            a = np.ascontiguousarray(np.asarray(canvas, dtype=np.uint8))
            dets = detector(a, 1)
            if not dets:
                continue
            shape = shape_predictor(a, dets[0])
            self.images.append(a)
            self.shapes.append(shape)
            self.chips.append(np.ascontiguousarray(dlib.get_face_chip(a, shape, size=150)))
            if len(self.images) == n:
                break
        if not self.images:
            raise RuntimeError("dlib found no face in the first LFW images")
        self._dlib = dlib

    def call(self, batch: int, from_shape: bool):
        idx = [i % len(self.images) for i in range(batch)]
        if from_shape:
            if batch == 1:
                return lambda: self.rec.compute_face_descriptor(self.images[0], self.shapes[0], 0)
            imgs = [self.images[i] for i in idx]
            faces = []
            for i in idx:
                dets = self._dlib.full_object_detections()
                dets.append(self.shapes[i])
                faces.append(dets)
            return lambda: self.rec.compute_face_descriptor(imgs, faces, 0)
        if batch == 1:
            return lambda: self.rec.compute_face_descriptor(self.chips[0], 0)
        chips = [self.chips[i] for i in idx]
        return lambda: self.rec.compute_face_descriptor(chips, 0)


# -- table 1: models -----------------------------------------------------------------------------------------------


def model_rows(bundle, source: str, args, crops: np.ndarray) -> tuple[list[dict], list[str]]:
    """Build every model of table 1 and time them interleaved at batch 1 and batch ``args.batch_size``."""
    entries: list[dict] = []
    notes: list[str] = []
    cfg = bundle.config
    # 'ms/face' for the dlib chip rows is per aligned chip; every other row takes 112x112 aligned uint8 crops

    def add(name, px, macs, params, embed_or_call, kind="crops"):
        entries.append(
            {"model": name, "input": px, "mult_adds": macs, "params": params, "fn": embed_or_call, "kind": kind}
        )

    cost = mobilenet_v1_cost(cfg.alpha, cfg.resolution, head="embedding", embedding_dim=cfg.embedding_dim)
    # ONNX Runtime (the served backend) first: rows[0], one pass, is what the speed target is judged on
    # one pass of the network, then the embedding as served: the bundle's test-time views, each mirror-averaged
    for backend, served in (("onnx", False), ("onnx", True), ("torch", False), ("torch", True)):
        emb = Embedder(bundle, flip=served, batch_size=args.batch_size, backend=backend, views=served)
        passes = view_count(emb.shift) * (2 if served else 1)
        add(
            f"default {cfg.backbone} a{cfg.alpha} r{cfg.resolution}, {backend}, "
            f"{f'as served ({passes} passes)' if served else 'one pass'} ({source})",
            cfg.resolution,
            cost.mult_adds * passes,
            cost.params,
            emb.embed,
        )
    if not args.no_variants:
        for alpha, res in [(a, 112) for a in ALPHAS] + [(0.5, r) for r in RESOLUTIONS]:
            torch.manual_seed(0)
            config = ModelConfig(alpha=alpha, resolution=res, embedding_dim=cfg.embedding_dim)
            net = build_model(config)
            recalibrate_bn(net, res)
            c = mobilenet_v1_cost(alpha, res, head="embedding", embedding_dim=cfg.embedding_dim)
            emb = Embedder(bundle_from_model(net, config), flip=False, batch_size=args.batch_size)
            add(f"mobilenet_v1 a{alpha} r{res} (random init), flip=off", res, c.mult_adds, c.params, emb.embed)
    if not args.no_reference:
        for channels_last in (True, False):
            try:
                net, emb = inception_resnet(channels_last)
            except Exception as exc:  # noqa: BLE001 - report and go on without it
                notes.append(f"InceptionResnetV1 unavailable: {type(exc).__name__}: {exc}")
                break
            emb.batch_size = args.batch_size
            add(
                f"InceptionResnetV1 (facenet-pytorch, random weights), {'channels-last' if channels_last else 'NCHW'}",
                160,
                count_macs(net, 160),
                n_params(net),
                emb.embed,
                kind="irv1",
            )
        try:
            dl = DlibDescriptor()
            add("dlib ResNet: compute_face_descriptor(image, 5-point shape)", 150, None, None, dl, kind="dlib_shape")
            add("dlib ResNet: compute_face_descriptor(aligned 150x150 chip)", 150, None, None, dl, kind="dlib_chip")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"dlib unavailable: {type(exc).__name__}: {exc}")

    def callable_for(e, batch):
        if e["kind"].startswith("dlib"):
            return e["fn"].call(batch, from_shape=e["kind"] == "dlib_shape")
        x = crops[:batch] if batch <= len(crops) else np.resize(crops, (batch, *crops.shape[1:]))
        return lambda: e["fn"](x)

    for batch, key, budget, rounds in (
        (1, "b1", args.seconds_b1, args.rounds_b1),
        (args.batch_size, "bN", args.seconds_bn, args.rounds_bn),
    ):
        progress(f"models: timing {len(entries)} models at batch {batch}, interleaved")
        samples = interleaved(
            {e["model"]: callable_for(e, batch) for e in entries},
            warmup=args.warmup,
            min_rounds=min(args.min_rounds, rounds),
            max_rounds=rounds,
            budget_s=budget,
            label=f"batch {batch}",
        )
        for e in entries:
            e[key] = stats(np.asarray(samples[e["model"]]) / batch)  # ms per face
    irv1 = [e for e in entries if e["kind"] == "irv1"]
    rows = []
    for e in entries:
        row = {k: v for k, v in e.items() if k != "fn"}
        if irv1:
            for key in ("b1", "bN"):
                ref = min(r[key]["median"] for r in irv1)  # the faster InceptionResnetV1 layout
                row[f"x_vs_irv1_{key}"] = ref / e[key]["median"]
        rows.append(row)
    return rows, notes


def models_table(rows: list[dict], batch: int) -> str:
    cols = [
        "model",
        "input px",
        "mult-adds (M)",
        "params (M)",
        "ms/face b=1 (median)",
        "b=1 p90",
        f"ms/face b={batch}",
        f"faces/s b={batch}",
        "x faster than IRV1 b=1",
        f"x faster than IRV1 b={batch}",
    ]
    out = []
    for r in rows:
        out.append(
            [
                r["model"],
                r["input"],
                r["mult_adds"] / 1e6 if r["mult_adds"] else None,
                r["params"] / 1e6 if r["params"] else None,
                r["b1"]["median"],
                r["b1"]["p90"],
                r["bN"]["median"],
                1000.0 / r["bN"]["median"],
                r.get("x_vs_irv1_b1"),
                r.get("x_vs_irv1_bN"),
            ]
        )
    return md_table(cols, out)


# -- table 2: speed work -------------------------------------------------------------------------------------------


def speed_rows(bundle, args, crops: np.ndarray, calibration: np.ndarray, threads: int):
    net = bundle.build()
    progress("speed work: building variants")
    variants, failed = build_all(net, calibration, threads, only=args.variants)
    baseline = Embedder(bundle, flip=False, batch_size=args.batch_size, views=False)
    reference = baseline.embed(crops)
    fns = {"Embedder (eager, channels-last): baseline": baseline.embed}
    agreement = {"Embedder (eager, channels-last): baseline": (0.0, 1.0, 1.0)}
    for v in variants:
        v.embedder.batch_size = args.batch_size
        e = v.embedder.embed(crops)
        cos = np.sum(e * reference, axis=1)
        agreement[v.name] = (float(np.abs(e - reference).max()), float(cos.min()), float(cos.mean()))
        fns[v.name] = v.embedder.embed
    results = {name: {"agreement": agreement[name]} for name in fns}
    for batch, key, budget, rounds in (
        (1, "b1", args.seconds_b1, args.rounds_b1),
        (args.batch_size, "bN", args.seconds_bn, args.rounds_bn),
    ):
        x = crops[:batch] if batch <= len(crops) else np.resize(crops, (batch, *crops.shape[1:]))
        progress(f"speed work: timing {len(fns)} variants at batch {batch}, interleaved")
        samples = interleaved(
            {name: (lambda f=f, x=x: f(x)) for name, f in fns.items()},
            warmup=args.warmup + 1,
            min_rounds=min(args.min_rounds, rounds),
            max_rounds=rounds,
            budget_s=budget,
            label=f"variants batch {batch}",
        )
        for name in fns:
            results[name][key] = stats(np.asarray(samples[name]) / batch)
            # ratio of medians of the per-round ratio: robust when the machine's speed drifts during the run
            base = np.asarray(samples["Embedder (eager, channels-last): baseline"])
            results[name][f"speedup_{key}"] = float(np.median(base / np.asarray(samples[name])))
    descriptions = {v.name: v.description for v in variants}
    keys = {v.name: v.key for v in variants}
    return results, failed, descriptions, keys


def speed_table(results: dict, batch: int) -> str:
    cols = [
        "variant",
        "ms/face b=1",
        "speed-up b=1",
        f"ms/face b={batch}",
        f"speed-up b={batch}",
        "max abs diff",
        "cosine min",
        "cosine mean",
    ]
    rows = []
    for name, r in results.items():
        maxabs, cmin, cmean = r["agreement"]
        rows.append(
            [
                name,
                r["b1"]["median"],
                f"{r['speedup_b1']:.2f}x",
                r["bN"]["median"],
                f"{r['speedup_bN']:.2f}x",
                f"{maxabs:.1e}",
                f"{cmin:.5f}",
                f"{cmean:.5f}",
            ]
        )
    return md_table(cols, rows)


def winners(results: dict, batch: int, min_cosine: float) -> list[str]:
    lines = []
    ok = {n: r for n, r in results.items() if r["agreement"][1] >= min_cosine}
    for key, label in (("b1", "batch 1"), ("bN", f"batch {batch}")):
        best = max(ok, key=lambda n, k=key: ok[n][f"speedup_{k}"])
        fastest = max(results, key=lambda n, k=key: results[n][f"speedup_{k}"])
        line = (
            f"- {label}: fastest with cosine >= {min_cosine} to eager is **{best}**, "
            f"{ok[best][f'speedup_{key}']:.2f}x the eager Embedder"
        )
        if fastest != best:
            line += (
                f"; fastest overall is {fastest} ({results[fastest][f'speedup_{key}']:.2f}x, "
                f"cosine min {results[fastest]['agreement'][1]:.4f})"
            )
        lines.append(line + ".")
    return lines


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--weights", help="weights bundle (default: the shipped one, else a fresh ModelConfig() network)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--batch-size", type=int, default=64, help="the large batch (default 64)")
    ap.add_argument(
        "--crops",
        type=Path,
        help="folder of aligned 112x112 PNG crops "
        "(default: $VISAGE_WORK_DIR/prepared/lfw/crops, else faces detected in the test photos)",
    )
    ap.add_argument("--seconds-b1", type=float, default=30.0, help="time budget of each batch-1 loop (default 30)")
    ap.add_argument("--seconds-bn", type=float, default=90.0, help="time budget of each large-batch loop (default 90)")
    ap.add_argument("--rounds-b1", type=int, default=300, help="most rounds of a batch-1 loop (default 300)")
    ap.add_argument("--rounds-bn", type=int, default=30, help="most rounds of a large-batch loop (default 30)")
    ap.add_argument("--min-rounds", type=int, default=5, help="fewest rounds of any loop (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first (default 2)")
    ap.add_argument("--no-variants", action="store_true", help="table 1 without the alpha/resolution variants")
    ap.add_argument("--no-reference", action="store_true", help="table 1 without InceptionResnetV1 and dlib")
    ap.add_argument("--no-speed-work", action="store_true", help="skip table 2 (inference variants)")
    ap.add_argument("--variants", nargs="*", choices=VARIANT_KEYS, help="table 2 variants (default: all)")
    ap.add_argument(
        "--min-cosine",
        type=float,
        default=0.999,
        help="agreement a variant needs to be called a winner (default 0.999)",
    )
    args = ap.parse_args()
    if args.quick:
        args.batch_size = min(args.batch_size, 16)
        args.seconds_b1, args.seconds_bn = 3.0, 4.0
        args.rounds_b1, args.rounds_bn, args.min_rounds, args.warmup = 20, 3, 2, 1
    threads = set_threads(args.threads)
    info = machine(threads)
    started = time.perf_counter()
    bundle, source = load_default_bundle(args.weights)
    crops, crops_source = real_crops(64, args.crops)
    calibration, _ = real_crops(64, args.crops, offset=1)
    progress(f"{source}; crops: {crops_source}")

    rows, notes = model_rows(bundle, source, args, crops)
    results: dict = {
        "machine": info,
        "weights": source,
        "crops": crops_source,
        "batch_size": args.batch_size,
        "models": rows,
        "notes": notes,
    }
    parts = [
        f"`{command_line()}`",
        machine_line(info),
        f"Default network: {source}. Inputs: {crops_source}. Times are per face (batch time / batch size), "
        f"median over interleaved rounds. 'x faster than IRV1' is against the faster of InceptionResnetV1's two "
        "memory layouts; the dlib rows take 150x150 inputs through dlib's own code, every other row 112x112 uint8 "
        "aligned crops through `crops_to_tensor` (resized to the network's input size).",
        "### Models",
        models_table(rows, args.batch_size),
    ]
    irv1 = [r for r in rows if r["kind"] == "irv1"]
    if irv1:
        default = rows[0]
        target = default.get("x_vs_irv1_b1", 0)
        verdict = "meets" if min(target, default.get("x_vs_irv1_bN", 0)) >= 10 else "does not meet"
        parts.append(
            f"Target: the default network (one pass, ONNX Runtime as served) >= 10x faster per face than "
            f"InceptionResnetV1: "
            f"{target:.1f}x at batch 1, {default.get('x_vs_irv1_bN', 0):.1f}x at batch "
            f"{args.batch_size} -- {verdict} it in this run. The embedding as served (the bundle's test-time views "
            f"and mirrors in one call, row 2): {rows[1].get('x_vs_irv1_b1', 0):.1f}x at batch 1, "
            f"{rows[1].get('x_vs_irv1_bN', 0):.1f}x at batch {args.batch_size}, against one pass of InceptionResnetV1."
        )
    dlib = [r for r in rows if r["kind"] == "dlib_chip"]
    if dlib:
        d = dlib[0]
        parts.append(
            f"Against dlib's ResNet (aligned chip): the default network (ONNX Runtime, one pass) is "
            f"{d['b1']['median'] / rows[0]['b1']['median']:.1f}x faster per face at batch 1, "
            f"{d['bN']['median'] / rows[0]['bN']['median']:.1f}x at batch {args.batch_size}."
        )
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))

    if not args.no_speed_work:
        speed, failed, descriptions, keys = speed_rows(bundle, args, crops, calibration, threads)
        results.update(
            speed_work=speed, speed_work_failed=failed, speed_work_descriptions=descriptions, speed_work_keys=keys
        )
        parts += [
            "### Speed work (inference variants of the default network)",
            "Speed-up = median over rounds of (eager time / variant time) in the same round; agreement = "
            "embeddings vs the eager Embedder's on 64 real aligned crops (flip off).",
            speed_table(speed, args.batch_size),
        ]
        bullets = winners(speed, args.batch_size, args.min_cosine)
        bullets += [f"- {k} not measured: {why}" for k, why in failed.items()]
        if "fresh" in source:
            bullets.append(
                "- The default network is untrained here: agreement (and int8 calibration) means little "
                "until the shipped bundle exists or --weights names a trained one."
            )
        parts.append("\n".join(bullets))
    results["seconds"] = time.perf_counter() - started
    emit("embedder", "Embedder: throughput and latency per face", "\n\n".join(parts), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
