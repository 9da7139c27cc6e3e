"""Prepared crops in memory, joined with identity labels and teacher targets, and batch augmentation."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from model.preprocess import crops_to_tensor
from training.prepare import read_manifest
from training.teacher import TeacherCache


@dataclass
class FaceSet:
    """Aligned crops (N, 112, 112, 3) uint8 with labels and, where known, teacher descriptors."""

    crops: np.ndarray
    identities: list[str]  # per image, namespaced by data set ("lfw/Colin_Powell")
    sources: list[str]
    sha256: list[str]
    fallback: np.ndarray  # bool: detector found nothing, centred region used
    teacher: np.ndarray | None = None  # (N, 128) float32
    teacher_flip: np.ndarray | None = None
    landmarks: np.ndarray | None = None  # (N, 5, 2) in source-image pixels, NaN where the manifest has none

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def labels(self) -> np.ndarray:
        names = {n: i for i, n in enumerate(sorted(set(self.identities)))}
        return np.array([names[n] for n in self.identities], dtype=np.int64)

    def subset(self, mask: np.ndarray) -> FaceSet:
        idx = np.nonzero(mask)[0]

        def pick(seq):
            return [seq[i] for i in idx]

        return FaceSet(
            self.crops[idx], pick(self.identities), pick(self.sources), pick(self.sha256), self.fallback[idx],
            None if self.teacher is None else self.teacher[idx],
            None if self.teacher_flip is None else self.teacher_flip[idx],
            None if self.landmarks is None else self.landmarks[idx],
        )

    def with_teacher(self, cache: TeacherCache) -> FaceSet:
        """Attach teacher targets by image hash; every image must have one (run ``visage teacher-embed``)."""
        index = cache.index()
        missing = [s for s, h in zip(self.sources, self.sha256, strict=True) if h not in index]
        if missing:
            raise ValueError(f"{len(missing)} images have no teacher descriptor (first: {missing[0]}); "
                             "run `visage teacher-embed` on their folder")
        rows = np.array([index[h] for h in self.sha256])
        self.teacher, self.teacher_flip = cache.desc[rows], cache.desc_flip[rows]
        return self


def concat(sets: list[FaceSet]) -> FaceSet:
    has_teacher = all(s.teacher is not None for s in sets)
    has_landmarks = all(s.landmarks is not None for s in sets)
    return FaceSet(
        np.concatenate([s.crops for s in sets]),
        [i for s in sets for i in s.identities],
        [i for s in sets for i in s.sources],
        [i for s in sets for i in s.sha256],
        np.concatenate([s.fallback for s in sets]),
        np.concatenate([s.teacher for s in sets]) if has_teacher else None,
        np.concatenate([s.teacher_flip for s in sets]) if has_teacher else None,
        np.concatenate([s.landmarks for s in sets]) if has_landmarks else None,
    )


def load_prepared(folder: str | Path, namespace: str = "") -> FaceSet:
    """Read a ``visage prepare`` output; the decoded crops are cached next to it as one .npy for speed."""
    folder = Path(folder)
    rows = [r for r in read_manifest(folder) if r.status != "failed"]
    if not rows:
        raise FileNotFoundError(f"no prepared crops in {folder} (run `visage prepare` first)")
    cache = folder / "crops.npy"
    manifest_mtime = (folder / "manifest.csv").stat().st_mtime
    crops = None
    if cache.exists() and cache.stat().st_mtime >= manifest_mtime:
        crops = _load_npy(cache)
    if crops is None or len(crops) != len(rows):
        crops = np.stack([np.asarray(Image.open(folder / r.crop).convert("RGB")) for r in rows])
        save_npy_atomically(cache, crops)
    prefix = f"{namespace}/" if namespace else ""
    return FaceSet(
        crops,
        [prefix + r.identity for r in rows],
        [r.source for r in rows],
        [r.sha256 for r in rows],
        np.array([r.status == "fallback" for r in rows]),
        landmarks=np.array([_parse_landmarks(r.landmarks) for r in rows]),
    )


def _parse_landmarks(text: str) -> np.ndarray:
    values = [float(v) for v in text.split()]
    return np.array(values).reshape(5, 2) if len(values) == 10 else np.full((5, 2), np.nan)


def sources_cache_path(sha256: list[str], cache: Path) -> Path:
    """Where ``load_sources`` keeps the decoded photos with these hashes, in this order."""
    key = hashlib.sha256("".join(sha256).encode()).hexdigest()[:16]
    return cache.with_name(f"{cache.stem}-{key}.npy")


def load_sources(paths: list[Path], sha256: list[str], cache: Path) -> np.ndarray:
    """The source photos at ``paths`` as one (N, H, W, 3) uint8 array (all must share one size, as LFW's and
    CelebA's 160 px crops do); decoded once and kept in ``cache`` (an .npy keyed by the images' hashes)."""
    from model.decode import decode_image

    path = sources_cache_path(sha256, cache)
    if path.exists() and (kept := _load_npy(path, mmap_mode="r")) is not None:
        return kept  # memory-mapped: batches read only their rows, ~1 GB stays on disk, not in RSS
    images = [np.asarray(decode_image(p.read_bytes())) for p in paths]
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"source photos differ in size ({sorted(sizes)[:3]}): consistent views need one size")
    out = np.stack(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy_atomically(path, out)
    return out


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temp file and a rename: a cache cut short (a full disk, kill -9) is never read."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    tmp.replace(path)


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray | None:
    """A cache file's array, or None when it cannot be read (cut short by an earlier version's plain np.save):
    the caller rebuilds it instead of failing on "mmap length is greater than file size" for good."""
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError):
        return None


@dataclass(frozen=True)
class Augment:
    """Cheap, batched augmentation: mirror, small similarity jitter, colour and greyscale."""

    flip: float = 0.5
    max_shift: float = 0.06  # fraction of the crop
    max_scale: float = 0.08
    max_rotate_deg: float = 8.0
    colour: float = 0.2
    grey: float = 0.1

    def __call__(self, crops: np.ndarray, resolution: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 crops -> (normalised input batch, bool mask of mirrored samples)."""
        x = crops_to_tensor(crops, resolution)
        n = x.shape[0]

        def u(lo=-1.0, hi=1.0):
            return torch.rand(n, generator=gen) * (hi - lo) + lo

        flipped = torch.rand(n, generator=gen) < self.flip
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
        ang = u() * math.radians(self.max_rotate_deg)
        scale = 1.0 + u() * self.max_scale
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        row0 = torch.stack([cos, -sin, u() * self.max_shift * 2], 1)
        row1 = torch.stack([sin, cos, u() * self.max_shift * 2], 1)
        theta = torch.stack([row0, row1], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return colour_jitter(x, self.colour, self.grey, gen).contiguous(), flipped


def colour_jitter(x: torch.Tensor, colour: float, grey: float, gen: torch.Generator, unit: float = 1.0) -> torch.Tensor:
    """Per-image contrast, brightness (+-``colour`` x ``unit``), saturation, and greyscale with probability
    ``grey`` on an (n, 3, H, W) batch; ``unit`` is one normalised step in the batch's scale (128 for pixels)."""
    n = x.shape[0]

    def u() -> torch.Tensor:  # drawn on the CPU generator whatever the batch's device
        return (torch.rand(n, generator=gen) * 2 - 1)[:, None, None, None].to(x.device)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u() * colour) + mean + u() * colour * unit
    grey_x = x.mean(1, keepdim=True)
    x = grey_x + (x - grey_x) * (1 + u() * colour)
    to_grey = (torch.rand(n, generator=gen) < grey)[:, None, None, None].to(x.device)
    return torch.where(to_grey, grey_x.expand_as(x), x)
