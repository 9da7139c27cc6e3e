"""Training configuration: one dataclass, loaded from a TOML file and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from model.errors import validation_problems
from model.mobilenet import ModelConfig
from model.tta import check_shift
from training.paths import read_text

# Ranges that pydantic checks with every field's type in TrainConfig.validate (the rules that tie several
# settings together follow there, by hand).
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, lt=1)]  # a fraction of the samples, or a decay


@dataclass
class TrainConfig:
    # strict: TOML already types every value, and a lax check would take true for 1 and "5" for 5; no inf or nan
    # (warmup_epochs=inf crashed the schedule, lr=inf trained an epoch of NaNs before failing)
    __pydantic_config__ = ConfigDict(strict=True, revalidate_instances="always", allow_inf_nan=False)

    # data: prepared folders (``visage prepare`` outputs) by namespace, relative to the work dir
    prepared: Annotated[dict[str, str], Field(min_length=1)] = field(
        default_factory=lambda: {"lfw": "prepared/lfw", "celeba": "prepared/celeba"})
    pairs: str = "lfw/pairs_dev.txt"  # relative to the shared data folder
    pairs_namespace: str = "lfw"  # which prepared set the pairs refer to
    # 1-based; their people are held out of training
    val_folds: Annotated[list[Positive], Field(min_length=1)] = field(default_factory=lambda: [7, 8])
    teacher_cache: str = "teacher_cache.npz"  # relative to the work dir
    teacher_center: bool = True  # subtract the mean descriptor before matching by angle (see losses.py)
    # "cached": targets are the teacher's descriptors of the plain and mirrored photo (teacher_cache);
    # "online": dlib's network runs in PyTorch on the very view the student sees (training/views.py), which
    # needs the source photos (``sources``, relative to the shared data folder) and prepare's landmarks
    teacher_mode: str = "cached"
    sources: dict[str, str] = field(default_factory=lambda: {"lfw": "lfw/images", "celeba": "celeba/images"})
    mixup: Share = 0.0  # online only: fraction of samples blended with another (the teacher describes the blend)
    cutmix: Share = 0.0  # online only: fraction of the rest given a rectangle of another aligned face (views.py)
    occlude: Share = 0.0  # online only: fraction of all samples with a one-colour rectangle over part of the face
    degrade: Share = 0.0  # online only: fraction of all samples whose photo is blurred (resampled at 35-100 %)
    # online only: the target is the mean of the teacher's descriptors of the chip and of its mirror image: dlib's
    # flip-mean (99.02 % against 98.79 % on LFW), and the student is served as the mean of a face and its mirror
    teacher_mirror: bool = False
    # multiplies the rotation (8 deg), scale (8 %) and shift (6 %) ranges
    augment_geometry: Annotated[float, Field(ge=0, le=4)] = 1.0
    # model
    backbone: str = "mobilenet_v1"
    alpha: float = 0.5
    resolution: int = 112
    embedding_dim: Positive = 128
    # start from these weights (a bundle or a training checkpoint; a path like --run-dir's): a
    # fine-tune with a fresh optimiser and schedule; "" trains from scratch. --resume takes precedence.
    init_weights: str = ""
    # objective
    miner: str = "batch_hard"  # batch_all / batch_hard / semi_hard
    margin: NonNegative = 0.2
    w_triplet: NonNegative = 1.0
    w_distill: NonNegative = 1.0
    w_relation: NonNegative = 0.0  # the teacher's pairwise cosines in the batch (losses.similarity_distillation_loss)
    # the teacher's similarity distribution over every training face, at this temperature
    # (losses.bank_distillation_loss); needs teacher_center
    w_bank: NonNegative = 0.0
    bank_temperature: Annotated[float, Field(gt=0, le=1)] = 0.05
    # margin softmax against every identity's teacher centroid (losses.proxy_margin_loss); unblended samples only
    w_proxy: NonNegative = 0.0
    # online only: the student's 7x7 map regresses the teacher's mid-level map cell by cell (training/hints.py)
    w_hint: NonNegative = 0.0
    proxy_scale: float = 30.0
    proxy_margin: float = 0.2
    # scoring (model/score_norm.py): the bundle carries a cohort of this many training faces' embeddings, and a
    # pair's score is its cosine minus the faces' mean cosine to their score_k nearest cohort faces; 0: cosine
    score_cohort: Count = 4096
    score_k: Positive = 16
    # test-time views (model/tta.py): the calibrated bundle averages each crop with four copies shifted by this
    # many pixels (10 forward passes a face with the mirror instead of 2); 0: the aligned crop only
    test_time_shift: int = 3
    # optimisation
    epochs: Positive = 30
    p: Annotated[int, Field(ge=2)] = 32  # identities a batch: a negative needs two
    k: Positive = 4
    optimizer: str = "adamw"  # adamw / sgd
    lr: NonNegative = 3e-3  # 0 is allowed: a run that only re-estimates BatchNorm statistics and calibrates
    weight_decay: NonNegative = 5e-4
    warmup_epochs: NonNegative = 1.0
    # exponential moving average of the weights (and BN statistics), updated every step with this decay; 0: off.
    # Validation and the bundle use the average: a cheap, within-run version of the soups in docs/TRAINING.md
    ema: Share = 0.0
    # sharpness-aware minimisation (training/sam.py): each step's gradient is taken at the worst point within this
    # L2 radius of the weights; 0: off. It costs a second forward and backward of the student per step
    sam: Annotated[float, Field(ge=0, le=1)] = 0.0  # Foret et al. used 0.05
    seed: Count = 0
    threads: Count = 0  # 0: torch's default
    # validate on the held-out pairs every this many epochs (and after the last): on a GPU one validation (CPU
    # embedding of the held-out faces) costs as long as an epoch's training (bench/gpu/README.md)
    val_every: Positive = 1
    amp: bool = True  # bfloat16 autocast on GPU only
    channels_last: bool = True

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(self.backbone, self.alpha, self.resolution, self.embedding_dim)

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss term reads the teacher's descriptors."""
        return self.w_distill > 0 or self.w_relation > 0 or self.w_proxy > 0 or self.w_bank > 0

    def validate(self) -> None:
        """Every field's type and range (pydantic, from the annotations), then the rules between settings."""
        from training.miners import MINERS

        try:
            _CHECKED.validate_python(self)
        except ValidationError as exc:
            problems = validation_problems(exc.errors(), lambda loc: ".".join(map(str, loc)))
            raise ValueError(f"invalid settings: {problems}") from None
        self.model.validate()
        if self.miner not in MINERS:
            raise ValueError(f"miner must be one of {sorted(MINERS)}, got {self.miner!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.w_triplet + self.w_distill + self.w_relation + self.w_proxy + self.w_bank == 0:
            raise ValueError("loss weights (w_triplet, w_distill, w_relation, w_proxy, w_bank) must not all be 0")
        if self.w_proxy > 0 and not (self.proxy_scale > 0 and 0 <= self.proxy_margin < 1):
            raise ValueError("proxy_scale must be > 0 and proxy_margin in [0, 1)")
        for name in ("w_proxy", "w_bank"):
            if getattr(self, name) > 0 and not self.teacher_center:
                raise ValueError(f"{name} needs teacher_center: raw dlib descriptors point almost the same way")
        if self.w_hint and (self.teacher_mode != "online" or self.backbone != "mobilenet_v1"):
            raise ValueError("w_hint needs teacher_mode=online and backbone mobilenet_v1 (the teacher's map is read "
                             "on the view the student sees, at a MobileNet v1 layer)")
        if self.teacher_mode not in ("cached", "online"):
            raise ValueError(f"teacher_mode must be cached or online, got {self.teacher_mode!r}")
        for name in ("mixup", "cutmix", "occlude", "degrade"):
            if getattr(self, name) and self.teacher_mode != "online":
                raise ValueError(f"{name} needs teacher_mode=online (a cached target ignores what the view shows)")
        if self.teacher_mirror and self.teacher_mode != "online":
            raise ValueError("teacher_mirror needs teacher_mode=online (the cached targets are of the plain and "
                             "mirrored photo already)")
        check_shift(self.test_time_shift, self.resolution, "test_time_shift")
        if self.w_triplet > 0 and self.k < 2:
            raise ValueError("the triplet term needs K >= 2 images per identity")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown(names: list[str], where: str) -> ValueError:
    """The error for settings TrainConfig lacks, each with its close match if any, and every known key: a file's
    typo said only "unknown settings ['epoch']", the same typo on the command line listed the keys."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    named = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, known, 1)) else repr(n)
             for n in names]
    return ValueError(f"unknown setting{'s' if len(names) > 1 else ''} {', '.join(named)}{where}; known: "
                      f"{', '.join(known)}")


def _coerce(name: str, raw: str) -> Any:
    if name not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise _unknown([name], "")
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
        try:
            data = tomllib.loads(read_text(path, "TOML config"))
        except OSError as exc:  # (path is --config's: "[Errno 2] No such file or directory: 'x'" named no option)
            raise type(exc)(f"--config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
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
        raise _unknown(sorted(unknown), f" in {path}" if path else "")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


_CHECKED = TypeAdapter(TrainConfig)  # every field's type and range, from the annotations above
