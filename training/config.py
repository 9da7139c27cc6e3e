"""Training configuration: one dataclass, loaded from a TOML file and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.mobilenet import ModelConfig
from model.tta import check_shift


@dataclass
class TrainConfig:
    # data: prepared folders (``visage prepare`` outputs) by namespace, relative to the work dir
    prepared: dict[str, str] = field(default_factory=lambda: {"lfw": "prepared/lfw", "celeba": "prepared/celeba"})
    pairs: str = "lfw/pairs_dev.txt"  # relative to the shared data folder
    pairs_namespace: str = "lfw"  # which prepared set the pairs refer to
    val_folds: list[int] = field(default_factory=lambda: [7, 8])  # 1-based; their people are held out of training
    teacher_cache: str = "teacher_cache.npz"  # relative to the work dir
    teacher_center: bool = True  # subtract the mean descriptor before matching by angle (see losses.py)
    # "cached": targets are the teacher's descriptors of the plain and mirrored photo (teacher_cache);
    # "online": dlib's network runs in PyTorch on the very view the student sees (training/views.py), which
    # needs the source photos (``sources``, relative to the shared data folder) and prepare's landmarks
    teacher_mode: str = "cached"
    sources: dict[str, str] = field(default_factory=lambda: {"lfw": "lfw/images", "celeba": "celeba/images"})
    mixup: float = 0.0  # online only: fraction of samples blended with another (the teacher describes the blend)
    cutmix: float = 0.0  # online only: fraction of the rest given a rectangle of another aligned face (views.py)
    occlude: float = 0.0  # online only: fraction of all samples with a one-colour rectangle over part of the face
    degrade: float = 0.0  # online only: fraction of all samples whose photo is blurred (resampled at 35-100 %)
    # online only: the target is the mean of the teacher's descriptors of the chip and of its mirror image: dlib's
    # flip-mean (99.02 % against 98.79 % on LFW), and the student is served as the mean of a face and its mirror
    teacher_mirror: bool = False
    augment_geometry: float = 1.0  # multiplies the rotation (8 deg), scale (8 %) and shift (6 %) ranges
    # model
    backbone: str = "mobilenet_v1"
    alpha: float = 0.5
    resolution: int = 112
    embedding_dim: int = 128
    # start from these weights (a bundle or a training checkpoint; a path like --run-dir's): a
    # fine-tune with a fresh optimiser and schedule; "" trains from scratch. --resume takes precedence.
    init_weights: str = ""
    # objective
    miner: str = "batch_hard"  # batch_all / batch_hard / semi_hard
    margin: float = 0.2
    w_triplet: float = 1.0
    w_distill: float = 1.0
    w_relation: float = 0.0  # the teacher's pairwise cosines in the batch (losses.similarity_distillation_loss)
    # margin softmax against every identity's teacher centroid (losses.proxy_margin_loss); unblended samples only
    w_proxy: float = 0.0
    # online only: the student's 7x7 map regresses the teacher's mid-level map cell by cell (training/hints.py)
    w_hint: float = 0.0
    proxy_scale: float = 30.0
    proxy_margin: float = 0.2
    # scoring (model/score_norm.py): the bundle carries a cohort of this many training faces' embeddings, and a
    # pair's score is its cosine minus the faces' mean cosine to their score_k nearest cohort faces; 0: cosine
    score_cohort: int = 4096
    score_k: int = 16
    # test-time views (model/tta.py): the calibrated bundle averages each crop with four copies shifted by this
    # many pixels (10 forward passes a face with the mirror instead of 2); 0: the aligned crop only
    test_time_shift: int = 3
    # optimisation
    epochs: int = 30
    p: int = 32
    k: int = 4
    optimizer: str = "adamw"  # adamw / sgd
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    # exponential moving average of the weights (and BN statistics), updated every step with this decay; 0: off.
    # Validation and the bundle use the average: a cheap, within-run version of the soups in docs/TRAINING.md
    ema: float = 0.0
    # sharpness-aware minimisation (training/sam.py): each step's gradient is taken at the worst point within this
    # L2 radius of the weights; 0: off. It costs a second forward and backward of the student per step
    sam: float = 0.0
    seed: int = 0
    threads: int = 0  # 0: torch's default
    # validate on the held-out pairs every this many epochs (and after the last): on a GPU one validation (CPU
    # embedding of the held-out faces) costs as long as an epoch's training (bench/gpu/README.md)
    val_every: int = 1
    amp: bool = True  # bfloat16 autocast on GPU only
    channels_last: bool = True

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(self.backbone, self.alpha, self.resolution, self.embedding_dim)

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss term reads the teacher's descriptors."""
        return self.w_distill > 0 or self.w_relation > 0 or self.w_proxy > 0

    def validate(self) -> None:
        from training.miners import MINERS

        self.model.validate()
        if self.miner not in MINERS:
            raise ValueError(f"miner must be one of {sorted(MINERS)}, got {self.miner!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        weights = (self.w_triplet, self.w_distill, self.w_relation, self.w_proxy)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError("loss weights (w_triplet, w_distill, w_relation, w_proxy) must be >= 0 and not all 0")
        if self.w_proxy > 0 and not (self.proxy_scale > 0 and 0 <= self.proxy_margin < 1):
            raise ValueError("proxy_scale must be > 0 and proxy_margin in [0, 1)")
        if self.w_proxy > 0 and not self.teacher_center:
            raise ValueError("w_proxy needs teacher_center: raw dlib descriptors point almost the same way")
        hint = self.w_hint
        if (isinstance(hint, bool) or not isinstance(hint, int | float) or not hint >= 0  # (refuses nan)
                or (hint and (self.teacher_mode != "online" or self.backbone != "mobilenet_v1"))):
            raise ValueError("w_hint must be >= 0 and needs teacher_mode=online and backbone mobilenet_v1 (the "
                             "teacher's map is read on the view the student sees, at a MobileNet v1 layer)")
        if not (isinstance(self.val_folds, list) and self.val_folds
                and all(isinstance(f, int) and f >= 1 for f in self.val_folds)):
            raise ValueError(f"val_folds must be a non-empty list of 1-based fold numbers, got {self.val_folds!r}")
        if self.teacher_mode not in ("cached", "online"):
            raise ValueError(f"teacher_mode must be cached or online, got {self.teacher_mode!r}")
        for name in ("mixup", "cutmix", "occlude", "degrade"):
            share = getattr(self, name)
            if not 0.0 <= share < 1.0 or (share and self.teacher_mode != "online"):
                raise ValueError(f"{name} must be in [0, 1) and needs teacher_mode=online (a cached target "
                                 "ignores what the view shows)")
        if self.teacher_mirror is not False and (self.teacher_mirror is not True or self.teacher_mode != "online"):
            raise ValueError(f"teacher_mirror must be true or false and needs teacher_mode=online (the cached "
                             f"targets are of the plain and mirrored photo already), got {self.teacher_mirror!r}")
        geometry = self.augment_geometry
        if isinstance(geometry, bool) or not isinstance(geometry, int | float) or not 0.0 <= geometry <= 4.0:
            raise ValueError(f"augment_geometry must be in [0, 4], got {self.augment_geometry!r}")
        check_shift(self.test_time_shift, self.resolution, "test_time_shift")
        if isinstance(self.val_every, bool) or not isinstance(self.val_every, int) or self.val_every < 1:
            raise ValueError(f"val_every must be a whole number of epochs >= 1, got {self.val_every!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, int | float) or not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1) (0: off), got {self.ema!r}")
        if isinstance(self.sam, bool) or not isinstance(self.sam, int | float) or not 0.0 <= self.sam <= 1.0:
            raise ValueError(f"sam must be a radius in [0, 1] (0: off; Foret et al. used 0.05), got {self.sam!r}")
        if self.w_triplet > 0 and self.k < 2:
            raise ValueError("the triplet term needs K >= 2 images per identity")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, raw: str) -> Any:
    kind = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(name)
    if kind is None:
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise ValueError(f"unknown setting {name!r}; known: {known}")
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings: miner=semi_hard


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (e.g. a bundle's recorded recipe), then the TOML file, then ``key=value`` items."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in fields}
    if path:
        data = tomllib.loads(Path(path).read_text())
        for key, v in data.items():
            # [sections] only group settings; a table-valued setting (``prepared``) is a value, not a section
            if isinstance(v, dict) and key not in fields:
                values.update(v)
            else:
                values[key] = v
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = _coerce(key.strip(), raw.strip())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
