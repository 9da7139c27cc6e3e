"""``visage train``: one loop for every recipe (distillation, triplets, both), on CPU or GPUs via torchrun.

Checkpoints every epoch (``--resume`` continues from the last), metrics as JSONL, a progress bar, validation
on held-out LFW folds every epoch, PNG plots, and at the end a weights bundle with calibrated thresholds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.bundle import Bundle, bundle_from_model, load_bundle, save_atomically, save_bundle
from model.cost import mobilenet_v1_cost
from model.embedder import Embedder
from model.errors import WeightsError
from model.mobilenet import build_model
from model.score_norm import CohortNorm, cohort_from
from model.tta import version_suffix
from training.config import TrainConfig, load_config
from training.data import Augment, FaceSet, concat, load_prepared, load_sources
from training.evaluate import threshold_at_far, verify
from training.hints import STUDENT_LAYER, TEACHER_BLOCK, TEACHER_CHANNELS, HintHead, hint_loss, tapped, teacher_grid
from training.losses import (
    bank_distillation_loss,
    distillation_loss,
    proxy_margin_loss,
    similarity_distillation_loss,
    teacher_proxies,
    triplet_margin_loss,
)
from training.miners import MINERS
from training.pairs import chosen_folds, people_in_folds, read_pairs
from training.paths import shared_data, work_dir
from training.sam import SharpnessAware, batchnorm_statistics_kept
from training.sampler import PKSampler
from training.teacher import TeacherCache, reference_cache, teacher_chip_matrices, teacher_network
from training.views import ViewAugment, ViewSource, student_matrix
from training.widen import widen_state_dict

log = logging.getLogger("visage.training")
FARS = ("1e-2", "1e-3", "1e-4")
SELF_MATCH_MARGIN = 0.02  # an identical copy of a photo clears the strictest threshold by at least this


@dataclass
class Split:
    train: FaceSet
    val: FaceSet
    val_left: np.ndarray  # indices into val
    val_right: np.ndarray
    val_same: np.ndarray
    val_folds: np.ndarray


def load_teacher(cfg: TrainConfig) -> TeacherCache:
    path = work_dir() / cfg.teacher_cache
    if path.exists():
        return TeacherCache.load(path)
    cache = reference_cache()
    cache.save(path)
    return cache


def load_split(cfg: TrainConfig, need_teacher: bool) -> Split:
    """Training faces minus every person in the validation folds; validation pairs over those people."""
    try:  # first: a wrong fold is refused before the faces load
        n_folds, pairs = read_pairs(shared_data() / cfg.pairs)
    except OSError as exc:  # (a bare "[Errno 2] ... '/work/shared/data/x.txt'" named no setting)
        raise type(exc)(f"pairs={cfg.pairs}: {exc.strerror or exc} ({shared_data() / cfg.pairs}; a relative path "
                        "is read under the shared data folder, VISAGE_SHARED_DATA)") from None
    folds = chosen_folds(cfg.val_folds, n_folds, "val_folds")
    sets = [load_prepared(work_dir() / folder, ns) for ns, folder in cfg.prepared.items()]
    faces = concat(sets)
    if need_teacher:
        faces = faces.with_teacher(load_teacher(cfg))
    held = {f"{cfg.pairs_namespace}/{p}" for p in people_in_folds(pairs, folds)}
    in_val = np.array([i in held for i in faces.identities])
    # the same photo prepared twice (a copy of the folder under another name) is held out wherever it is
    held_photos = {h for h, v in zip(faces.sha256, in_val, strict=True) if v}
    in_val |= np.array([h in held_photos for h in faces.sha256])
    val = faces.subset(in_val)
    where = {(i.split("/")[0], s): n for n, (i, s) in enumerate(zip(val.identities, val.sources, strict=True))}
    chosen = [p for p in pairs if p.fold in folds]
    missing = [p for p in chosen for s in (p.left, p.right) if (cfg.pairs_namespace, s) not in where]
    if missing:
        raise ValueError(f"{len(missing)} validation pair images are not in the prepared set "
                         f"pairs_namespace={cfg.pairs_namespace!r} names (e.g. {missing[0]}); prepared sets: "
                         f"{', '.join(f'{ns}={folder}' for ns, folder in cfg.prepared.items())}")
    return Split(
        train=faces.subset(~in_val),
        val=val,
        val_left=np.array([where[(cfg.pairs_namespace, p.left)] for p in chosen]),
        val_right=np.array([where[(cfg.pairs_namespace, p.right)] for p in chosen]),
        val_same=np.array([p.same for p in chosen]),
        val_folds=np.array([p.fold for p in chosen]),
    )


SOURCES_CACHE = "cache/sources.npy"  # under the work dir: decoded photos (training.data.load_sources)
CHIPS_CACHE = "cache/teacher_chips.npz"  # the teacher's chip framings (training.teacher.teacher_chip_matrices)


def load_views(cfg: TrainConfig, faces: FaceSet, progress: bool = True) -> ViewSource:
    """Source photos, the serving alignment (prepare's landmarks) and the teacher's chip framing of ``faces``."""
    if faces.landmarks is None or np.isnan(faces.landmarks).any():
        raise ValueError("teacher_mode=online needs the landmarks `visage prepare` records: re-run it into a new "
                         "folder (manifests written before they were recorded have none)")
    roots = {ns: shared_data() / folder for ns, folder in cfg.sources.items()}
    missing = {i.split("/")[0] for i in faces.identities} - set(roots)
    if missing:
        raise ValueError(f"no source folder for data sets {sorted(missing)}: set `sources`")
    paths = [roots[i.split("/")[0]] / s for i, s in zip(faces.identities, faces.sources, strict=True)]
    images = load_sources(paths, faces.sha256, work_dir() / SOURCES_CACHE)
    teacher = teacher_chip_matrices(paths, work_dir() / CHIPS_CACHE, progress=progress)
    return ViewSource(images, np.stack([student_matrix(m) for m in faces.landmarks]), teacher)


def load_teacher_net(device: torch.device) -> nn.Module:
    return teacher_network().to(device, memory_format=torch.channels_last).requires_grad_(False)


def describe(teacher_net: nn.Module, chips: torch.Tensor, mirror: bool) -> torch.Tensor:
    """The teacher's descriptors of the chips, in float32; with ``mirror``, the mean with their mirror images'.

    A hook on the teacher then sees the chips first and their mirrors after them."""
    if not mirror:
        return teacher_net(chips).float()
    both = teacher_net(torch.cat([chips, chips.flip(-1)])).float()
    return (both[:len(chips)] + both[len(chips):]) / 2


def validate(bundle: Bundle, split: Split) -> tuple[dict, np.ndarray]:
    """The protocol on the held-out pairs, scored as the bundle scores (plain cosine while training: no cohort)."""
    emb = Embedder(bundle, flip=True).embed(split.val.crops)
    return protocol(bundle.scorer, emb, split), emb


def protocol(scorer: CohortNorm, emb: np.ndarray, split: Split) -> dict:
    """The n-fold protocol on the held-out pairs of ``split``, given its held-out faces' embeddings."""
    return verify(scorer.pairs(emb[split.val_left], emb[split.val_right]), split.val_same, split.val_folds).to_dict()


def score_cohort(bundle: Bundle, faces: FaceSet, size: int, k: int, seed: int = 0) -> CohortNorm:
    """The bundle's scoring cohort: ``size`` training faces drawn at random (seeded), embedded by its network."""
    if size <= 0 or k <= 0:
        return CohortNorm.plain(bundle.config.embedding_dim)
    pick = np.sort(np.random.default_rng(seed).choice(len(faces.crops), min(size, len(faces.crops)), replace=False))
    return cohort_from(Embedder(bundle, flip=True).embed(faces.crops[pick]), k)


def all_pairs(emb: np.ndarray, identities: list[str], scorer: CohortNorm) -> tuple[np.ndarray, np.ndarray]:
    """The score of every pair of faces, and whether the pair is genuine (same identity): millions of pairs among
    the held-out faces, computed once for both the thresholds and the TAR they give."""
    labels = np.unique(identities, return_inverse=True)[1]
    iu = np.triu_indices(len(emb), 1)
    return scorer.matrix(emb, emb)[iu], labels[iu[0]] == labels[iu[1]]


def calibrate(pairs: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Thresholds at FAR 1e-2, 1e-3 and 1e-4 from every impostor pair among held-out faces (``all_pairs``)."""
    scores, same = pairs
    # rounded up, never below the quantile: on a collapsed network whose scores all lie within 1e-4, rounding to
    # the nearest let 82 % of impostors through every threshold
    return {far: math.ceil(threshold_at_far(scores[~same], float(far)) * 1e4) / 1e4 for far in FARS}


def few_impostor_warnings(impostors: int) -> list[str]:
    """What a threshold at FAR f means when fewer than 1/f impostor pairs were there to set it."""
    return [f"the threshold at FAR {far} rests on {impostors} impostor pairs, fewer than {round(1 / float(far))}: "
            "it sits at the highest impostor scores seen, not at that FAR; calibrate on more held-out people"
            for far in FARS if impostors * float(far) < 1]


def all_pairs_tar(pairs: tuple[np.ndarray, np.ndarray], thresholds: dict[str, float]) -> dict:
    """The share of *every* genuine pair among the held-out faces accepted at each calibrated threshold.

    Tens of thousands of genuine pairs instead of the protocol's 600: a much steadier yardstick for comparing
    models than the 1,200-pair accuracy (+-0.8 points between runs of the same recipe)."""
    scores, same = pairs
    genuine = scores[same]
    return {"genuine_pairs": int(same.sum()), "impostor_pairs": int((~same).sum()),
            **{f"tar_at_far_{far}": round(float(np.mean(genuine > thr)), 4) for far, thr in thresholds.items()}}


def calibrate_bundle(bundle: Bundle, cfg: TrainConfig, split: Split) -> dict:
    """Give the bundle its scoring cohort (training faces), offset cap and thresholds (held-out impostor pairs);
    returns the held-out validation under that scoring. ``metadata["calibration"]`` records what was used."""
    # the views define the embedding: cohort, thresholds and model version all follow from them
    bundle.metadata["views"] = {"shift": cfg.test_time_shift}
    bundle.metadata.update(version_names(bundle))
    bundle.score_norm = score_cohort(bundle, split.train, cfg.score_cohort, cfg.score_k, cfg.seed)
    emb = Embedder(bundle, flip=True).embed(split.val.crops)
    pairs = all_pairs(emb, split.val.identities, bundle.scorer)
    thresholds = calibrate(pairs)
    self_match = True  # plain cosine: an identical copy scores 1
    if bundle.scorer.enabled:
        # an identical copy of a photo scores 1 - offset: cap the offsets so that it clears the strictest
        # threshold, then calibrate again under the cap (it moves the thresholds only if held-out hubs reach it)
        cap = min(1.0, round(1.0 - max(thresholds.values()) - SELF_MATCH_MARGIN, 4))
        bundle.score_norm = replace(bundle.scorer, cap=cap)
        pairs = all_pairs(emb, split.val.identities, bundle.scorer)
        thresholds = calibrate(pairs)
        self_match = 1.0 - bundle.scorer.cap - max(thresholds.values()) >= SELF_MATCH_MARGIN / 2
        if not self_match:  # impostors as close as identical copies: an untrained or collapsed network
            log.warning("offset cap %s leaves identical photos at the strictest threshold %s: the network does not "
                        "tell faces apart", bundle.scorer.cap, max(thresholds.values()))
    val = protocol(bundle.scorer, emb, split)
    val["all_pairs"] = all_pairs_tar(pairs, thresholds)
    val["warnings"] = few_impostor_warnings(val["all_pairs"]["impostor_pairs"])
    for warning in val["warnings"]:
        log.warning(warning)
    val["scoring"] = bundle.scorer.tag
    bundle.metadata["thresholds"] = thresholds
    bundle.metadata["calibration"] = {
        "scoring": bundle.scorer.tag, "cohort": len(bundle.scorer.cohort), "k": bundle.scorer.k,
        "cap": bundle.scorer.cap, "self_match": self_match, "seed": cfg.seed,
        "prepared": cfg.prepared, "pairs": cfg.pairs, "val_folds": cfg.val_folds,
    }
    return val


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def rank_zero_first(rank: int, world: int, load):
    """``load()`` on rank 0 first, then on the other ranks: what it caches on disk (teacher targets, decoded
    photos, chip framings) is written by one process, and read by the rest."""
    if world > 1 and rank > 0:
        torch.distributed.barrier()
    out = load()
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return out


def geometry_scaled(augment: Augment, factor: float) -> Augment:
    """``augment`` with its rotation, scale and shift ranges multiplied by ``factor`` (colour left alone)."""
    return replace(augment, max_rotate_deg=augment.max_rotate_deg * factor, max_scale=augment.max_scale * factor,
                   max_shift=augment.max_shift * factor)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for key in ("loss", "distill", "triplet", "proxy", "hint", "bank"):
        if any(key in h for h in history):
            a.plot(ep, [h.get(key, np.nan) for h in history], label=key)
    a.set_xlabel("epoch"), a.set_title("training loss"), a.legend(), a.grid(alpha=0.3)
    validated = [h for h in history if "val_accuracy" in h]  # every val_every epochs
    b.plot([h["epoch"] for h in validated], [100 * h["val_accuracy"] for h in validated], marker="o")
    b.set_xlabel("epoch"), b.set_ylabel("%"), b.set_title("held-out LFW accuracy"), b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          max_steps: int | None = None) -> Path:
    """Train, validating every ``val_every`` epochs and after the last; returns the final weights bundle's path."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.pt"
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--run-dir {run_dir} is a file: give a folder (made if missing)")
    if resume and not ckpt_path.is_file():  # a mistyped run folder must not start hours afresh
        raise FileNotFoundError(f"nothing to resume: no checkpoint {ckpt_path}; drop --resume to start a new run "
                                "there")
    if not resume and ckpt_path.exists():  # ... nor overwrite hours of work and its metrics
        raise FileExistsError(f"{run_dir} already holds a run (last.pt): add --resume to continue it, or give "
                              "another --run-dir (or delete that one) to start afresh")
    ckpt = load_checkpoint(ckpt_path, RESUME_KEYS) if resume else None
    was = load_config(base=ckpt["config"]) if ckpt is not None else None  # (checked before the data loads)
    if was is not None and was.model != cfg.model:
        raise ValueError(f"{ckpt_path} trains {was.model}, but this config asks for {cfg.model}: resume with the "
                         f"run's own settings ({run_dir / 'config.json'})")
    split = ("pairs", "pairs_namespace", "val_folds")  # who is held out: a change would validate on trained people
    if was is not None and (changed := [k for k in split if getattr(was, k) != getattr(cfg, k)]):
        raise ValueError(f"{ckpt_path} holds out the people of {', '.join(f'{k}={getattr(was, k)}' for k in changed)}"
                         f"; resume it with the same {' and '.join(changed)} (a change would validate and calibrate "
                         "on people it has trained on)")
    if was is not None and was.optimizer != cfg.optimizer:  # its state is kept
        raise ValueError(f"{ckpt_path} was trained with optimizer={was.optimizer}: resume it with the same optimizer")
    finished = run_dir / "bundle.pt"
    if (ckpt is not None and cfg.epochs <= (done := ckpt["epoch"] + 1) and finished.is_file()
            and finished.stat().st_mtime >= ckpt_path.stat().st_mtime):  # it exited 0, redoing the bundle, silently
        raise ValueError(f"{run_dir} has trained its {done} epoch{'s' if done > 1 else ''} and its bundle.pt is "
                         f"written: nothing to do (give epochs above {done} to train on). A resume with no epochs "
                         "left only writes bundle.pt, for a run stopped after its last checkpoint")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (batches per epoch), got {max_steps}")
    rank, world = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = rank_zero_first(rank, world, lambda: load_split(cfg, need_teacher=cfg.uses_teacher))
    sampler = PKSampler(split.train.labels, cfg.p, cfg.k, seed=cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    hint = hint_net = None
    if cfg.w_hint > 0:  # a regressor that trains beside the student and is not shipped
        hint = HintHead(model.body.features[STUDENT_LAYER].pointwise[0].out_channels, TEACHER_CHANNELS).to(device)
        hint_net = nn.parallel.DistributedDataParallel(hint) if world > 1 else hint
    trained = [*model.parameters(), *(hint.parameters() if hint is not None else ())]
    params = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    opt = (torch.optim.AdamW(params, lr=cfg.lr) if cfg.optimizer == "adamw"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True))
    steps_per_epoch = len(sampler) // world
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, int(cfg.warmup_epochs * steps_per_epoch)))
    start_epoch, history = 0, []
    if cfg.init_weights and not resume:
        model.load_state_dict(initial_weights(cfg))
    ema = weight_average(model, cfg.ema)
    if ckpt is not None:
        if bool(ckpt["config"].get("w_hint")) != (hint is not None):  # the optimiser holds the regressor or not
            raise ValueError(f"{ckpt_path} was trained with w_hint={ckpt['config'].get('w_hint', 0)}: resume it "
                             "with hints on or off as it was (the weight itself may change)")
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"]), sched.load_state_dict(ckpt["sched"])
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        if hint is not None:
            hint.load_state_dict(ckpt["hint"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        if rank == 0:  # a stop between an epoch's metrics line and its checkpoint left that epoch twice
            lines = "".join(json.dumps(record) + "\n" for record in history)
            tmp = run_dir / "metrics.jsonl.tmp"
            tmp.write_text(lines)
            tmp.replace(run_dir / "metrics.jsonl")
        sampler.rng = np.random.default_rng(cfg.seed + start_epoch)
        ckpt = None  # (its tensors are copied: free them for the run)
    served = ema.module if ema is not None else model  # what validation sees and the bundle holds
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    miner, augment = MINERS[cfg.miner], geometry_scaled(Augment(), cfg.augment_geometry)
    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)
    crops = split.train.crops
    labels_all = torch.as_tensor(split.train.labels)
    teacher = teacher_flip = None
    centre = torch.zeros(128)
    if split.train.teacher is not None:
        teacher, teacher_flip = torch.as_tensor(split.train.teacher), torch.as_tensor(split.train.teacher_flip)
        if cfg.teacher_center:
            # dlib's descriptors share a large common component (raw pair cosines average 0.89): matched by
            # angle as they are, every face looks alike. Their Euclidean geometry ignores that offset, so remove it.
            centre = torch.cat([teacher, teacher_flip]).mean(0)
            teacher, teacher_flip = teacher - centre, teacher_flip - centre
    proxies = None
    if cfg.w_proxy > 0:
        proxies = teacher_proxies(torch.cat([teacher, teacher_flip]), torch.cat([labels_all, labels_all]),
                                  int(labels_all.max()) + 1).to(device)
    bank = None
    if cfg.w_bank > 0:  # every training face as the teacher saw it, plain and mirrored: ~24k x 128 floats
        bank = F.normalize(torch.cat([teacher, teacher_flip]).float(), dim=1).to(device)
    views = teacher_net = None
    if cfg.teacher_mode == "online":
        views = rank_zero_first(rank, world, lambda: load_views(cfg, split.train, progress and rank == 0))
        if device.type != "cpu":
            views = views.to(device)
        teacher_net = load_teacher_net(device)
        view_augment = ViewAugment(augment, mixup=cfg.mixup, cutmix=cfg.cutmix, occlude=cfg.occlude,
                                   degrade=cfg.degrade)
        centre = centre.to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    sam = SharpnessAware(trained, cfg.sam) if cfg.sam > 0 else None

    def objective(x: torch.Tensor, labels: torch.Tensor, mixed: torch.Tensor, target: torch.Tensor | None,
                  idx: np.ndarray, teacher_map: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch's loss and its terms (as floats, for the log); ``mixed`` marks the blended samples."""
        student_tap = tapped(model.body.features[STUDENT_LAYER]) if hint is not None else nullcontext([])
        with autocast, student_tap as student_maps:
            emb = net(x).float()
        loss = emb.sum() * 0.0
        stats: dict[str, float] = {}
        if cfg.w_distill > 0:
            d = distillation_loss(emb, target)
            loss = loss + cfg.w_distill * d
            stats["distill"] = float(d.detach())
        if cfg.w_relation > 0:
            r = similarity_distillation_loss(emb, target)
            loss = loss + cfg.w_relation * r
            stats["relation"] = float(r.detach())
        if bank is not None:
            b = bank_distillation_loss(emb, target, bank, cfg.bank_temperature)
            loss = loss + cfg.w_bank * b
            stats["bank"] = float(b.detach())
        if hint is not None:
            grid = teacher_grid(views.student[idx], views.teacher[idx], cfg.resolution,
                                student_maps[0].shape[-1], teacher_map.shape[-1])
            with autocast:
                projected = hint_net(student_maps[0])
            h = hint_loss(projected, teacher_map, grid)
            loss = loss + cfg.w_hint * h
            stats["hint"] = float(h.detach())
        pure = ~mixed  # a blend has no single identity: the label terms use the unblended samples
        if cfg.w_proxy > 0:
            c = proxy_margin_loss(emb[pure], labels[pure], proxies, cfg.proxy_scale, cfg.proxy_margin)
            loss = loss + cfg.w_proxy * c
            stats["proxy"] = float(c.detach())
        if cfg.w_triplet > 0:
            t, active = triplet_margin_loss(emb[pure], miner(emb[pure], labels[pure], cfg.margin), cfg.margin)
            loss = loss + cfg.w_triplet * t
            stats["triplet"], stats["active"] = float(t.detach()), active
        return loss, stats

    t_start = time.time() - _previous_seconds(history, start_epoch)  # the clock continues across --resume
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        sums: dict[str, float] = {}
        batches = [b for i, b in enumerate(sampler) if i % world == rank][:steps_per_epoch]
        if max_steps:
            batches = batches[:max_steps]
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress or rank > 0)
        for idx in bar:
            mixed = torch.zeros(len(idx), dtype=torch.bool)
            if views is not None:
                x, chips, mixed = views.draw(idx, cfg.resolution, view_augment, gen)
                teacher_tap = tapped(teacher_net.blocks[TEACHER_BLOCK]) if hint is not None else nullcontext([])
                # full precision: the targets' small differences are the signal
                with torch.no_grad(), teacher_tap as teacher_maps:
                    chips = chips.to(device, memory_format=torch.channels_last)
                    online_target = describe(teacher_net, chips, cfg.teacher_mirror) - centre
            else:
                x, flipped = augment(crops[idx], cfg.resolution, gen)
            x = x.to(device, memory_format=memory_format)
            target = None
            if cfg.uses_teacher:
                if views is not None:
                    target = online_target
                else:
                    target = torch.where(flipped[:, None], teacher_flip[idx], teacher[idx]).to(device)
            teacher_map = teacher_maps[0][:len(idx)] if hint is not None else None  # (not the mirrors' maps)
            batch = (x, labels_all[idx].to(device), mixed.to(device), target, idx, teacher_map)
            loss, stats = objective(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sam is not None:  # the same batch again, at the worst point within rho of the weights
                sam.ascend()
                opt.zero_grad(set_to_none=True)
                with batchnorm_statistics_kept(model, *([hint] if hint is not None else [])):
                    objective(*batch)[0].backward()
                sam.descend()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            stats["loss"] = float(loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()})
        record = {k: v / max(1, len(batches)) for k, v in sums.items()}
        if rank == 0:
            record.update(epoch=epoch + 1, lr=sched.get_last_lr()[0])
            validating = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            if validating:
                val, _ = validate(bundle_from_model(served, cfg.model), split)
                record.update(val_accuracy=val["accuracy"], val_std=val["accuracy_std"], val_auc=val["auc"])
            record["seconds"] = round(time.time() - t_start, 1)
            history.append(record)
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            save_atomically({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                             **({"ema": ema.state_dict()} if ema is not None else {}),
                             **({"hint": hint.state_dict()} if hint is not None else {}),
                             "epoch": epoch, "history": history, "config": cfg.to_dict()}, ckpt_path)
            if validating:  # (a plot takes ~0.15 s here: 7 % of an epoch on the H200)
                plot_history(history, run_dir / "training.png")
            if progress:
                print(json.dumps(record), flush=True)
    if world > 1:
        torch.distributed.barrier()
    out = run_dir / "bundle.pt"
    if rank == 0:
        finish(served, cfg, split, history, time.time() - t_start, out)
    return out


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BN statistics (``decay`` per step), or None at 0.
    Averaging along one run's path is the within-run counterpart of the soups of separate runs."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


RESUME_KEYS = frozenset({"model", "opt", "sched", "config", "epoch", "history"})
EXPORT_KEYS = frozenset({"model", "config", "epoch", "history"})


def load_checkpoint(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """A run's ``last.pt``; a missing, damaged or foreign file is one ``WeightsError`` naming it (torch raises
    UnpicklingError, EOFError, KeyError... for the same problem)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:  # (not weights-only: it holds the optimiser's state and the recipe)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable training checkpoint ({type(exc).__name__}: damaged or "
                           "truncated?)") from exc
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
        what = "a weights bundle" if isinstance(ckpt, dict) and "state_dict" in ckpt else "something else"
        raise WeightsError(f"{path} is not a training checkpoint of `visage train` (it is {what})")
    return ckpt


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The state dict a fine-tune starts from: a weights bundle or a ``last.pt`` checkpoint of the same network,
    or of a narrower MobileNet v1, widened (``training.widen``)."""
    path = Path(cfg.init_weights)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights: {path} is not a file")
    try:  # (not weights-only: a training checkpoint, last.pt, holds the optimiser's state too)
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a text file, a truncated file: torch raises many types, all meaning the same
        raise WeightsError(f"init_weights: {path} is neither a Visage weights bundle nor a training checkpoint "
                           f"(last.pt) ({type(exc).__name__})") from exc
    if isinstance(payload, dict) and {"model", "config"} <= payload.keys():  # a training checkpoint
        saved, state = load_config(base=payload["config"]).model, payload["model"]
    else:  # a bundle, or something else: load_bundle says exactly what is wrong with it
        bundle = load_bundle(path)
        saved, state = bundle.config, bundle.state_dict
    if saved == cfg.model:
        return state
    try:  # a wider student (or another input size) starts from the narrow one's function, not from scratch
        widened = widen_state_dict(state, saved, cfg.model, seed=cfg.seed)
    except ValueError as err:
        raise ValueError(f"init_weights {path} holds {saved}, but this run trains {cfg.model}: {err}") from None
    print(f"init_weights: widened {saved} to {cfg.model} (function-preserving)", flush=True)
    return widened


def _previous_seconds(history: list[dict], start_epoch: int) -> float:
    """Training time already spent before a ``--resume`` (the per-epoch clock restarts with the process)."""
    return float(history[start_epoch - 1]["seconds"]) if start_epoch and history else 0.0


def finish(model: nn.Module, cfg: TrainConfig, split: Split, history: list[dict], seconds: float, out: Path) -> Path:
    """Validate, calibrate thresholds on held-out impostor pairs and write the weights bundle."""
    bundle = bundle_from_model(model.to(memory_format=torch.contiguous_format), cfg.model)
    val = calibrate_bundle(bundle, cfg, split)
    bundle.metadata.update(finished_metadata(cfg, bundle, val, bundle.metadata["thresholds"], history, seconds,
                                             next(model.parameters()).device))
    return save_bundle(bundle, out)


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Turn a run's latest checkpoint into a calibrated bundle, e.g. to try a model while training goes on."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "last.pt", EXPORT_KEYS)
    cfg = load_config(base=ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    ema = weight_average(model, cfg.ema)
    if ema is not None and "ema" in ckpt:  # the run serves its weight average
        ema.load_state_dict(ckpt["ema"])
        model = ema.module
    split = load_split(cfg, need_teacher=False)
    history = ckpt["history"]
    return finish(model, cfg, split, history, float(history[-1]["seconds"]) if history else 0.0,
                  Path(out) if out else run_dir / f"bundle-epoch{ckpt['epoch'] + 1}.pt")


def version_names(bundle: Bundle) -> dict[str, str]:
    """The bundle's ``name`` (its architecture) and ``model_version`` (that name + its weights' digest + its
    test-time views)."""
    cfg = bundle.config
    name = f"{cfg.backbone}-a{cfg.alpha}-r{cfg.resolution}-d{cfg.embedding_dim}"
    suffix = version_suffix(bundle.test_time_shift)
    return {"model_version": f"{name}-{bundle.weights_digest()[:10]}{suffix}", "name": name}


def finished_metadata(cfg: TrainConfig, bundle: Bundle, val: dict, thresholds: dict, history: list[dict],
                      seconds: float, device: torch.device) -> dict:
    cost = mobilenet_v1_cost(cfg.alpha, cfg.resolution, head="embedding", embedding_dim=cfg.embedding_dim) \
        if cfg.backbone == "mobilenet_v1" else None
    return {
        **version_names(bundle),
        "input_size": cfg.resolution,
        "thresholds": thresholds,
        "validation": {"pairs_file": cfg.pairs, "folds": cfg.val_folds, **val},  # val["pairs"]: their count
        "recipe": cfg.to_dict(),
        "epochs_run": len(history),
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {device.type}, {torch.get_num_threads()} threads",
        "mult_adds": cost.mult_adds if cost else None,
        "params": sum(v.numel() for k, v in bundle.state_dict.items() if "running" not in k and "num_batches" not in k),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
