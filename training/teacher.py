"""The distillation teacher: dlib's ResNet face descriptor, computed once per image and cached by image hash.

The method is the one in ``shared/data/teacher/SOURCE.md`` (crop pasted at (45, 45) on a 250x250 grey
canvas, HOG detector with one upsampling, face nearest the centre, fixed fallback box, 5-point chip, no jitter;
the mirrored canvas gives ``desc_flip``), so our own descriptors match the shipped reference rows. dlib is an
optional extra (``pip install .[teacher]``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.paths import shared_data, teacher_reference

CANVAS, OFFSET, GREY = 250, 45, (128, 128, 128)
FALLBACK_BOX = (50, 50, 200, 200)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _models_dir() -> Path:
    # ``import face_recognition_models`` needs pkg_resources (gone in setuptools >= 82): find the files instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dlib teacher needs the optional extra: pip install 'visage[teacher]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibTeacher:
    """dlib's 128-d descriptor (about 100 ms a face on these CPUs): plain and mirrored."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise RuntimeError("the dlib teacher needs the optional extra: pip install 'visage[teacher]'") from exc
        models = _models_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def canvas(self, image: Image.Image) -> np.ndarray:
        canvas = Image.new("RGB", (CANVAS, CANVAS), GREY)
        canvas.paste(image.convert("RGB"), (OFFSET, OFFSET))
        return np.ascontiguousarray(np.asarray(canvas, dtype=np.uint8))

    def describe_canvas(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        dlib = self._dlib
        dets = self.detector(a, 1)
        c = a.shape[1] / 2.0
        if dets:
            r = min(dets, key=lambda r: (r.center().x - c) ** 2 + (r.center().y - c) ** 2)
            h, w = a.shape[:2]
            r = dlib.rectangle(max(r.left(), 0), max(r.top(), 0), min(r.right(), w), min(r.bottom(), h))
        else:
            r = dlib.rectangle(*FALLBACK_BOX)
        desc = np.array(self.rec.compute_face_descriptor(a, self.shape(a, r), 0), dtype=np.float32)
        af = np.ascontiguousarray(a[:, ::-1, :])
        w = a.shape[1] - 1
        rf = dlib.rectangle(w - r.right(), r.top(), w - r.left(), r.bottom())
        desc_flip = np.array(self.rec.compute_face_descriptor(af, self.shape(af, rf), 0), dtype=np.float32)
        return desc, desc_flip, not dets

    def describe_file(self, path: str | Path) -> tuple[np.ndarray, np.ndarray, bool]:
        """A 160x160 LFW/CelebA-style crop file -> (desc, desc_flip, fallback)."""
        with Image.open(path) as img:
            return self.describe_canvas(self.canvas(img))


@dataclass
class TeacherCache:
    """sha256 of the source image -> (desc, desc_flip). Saved as one npz (no pickles)."""

    keys: list[str]
    desc: np.ndarray
    desc_flip: np.ndarray

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, keys=np.array(self.keys), desc=self.desc, desc_flip=self.desc_flip)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        with np.load(path) as z:
            return cls(list(z["keys"]), z["desc"], z["desc_flip"])

    @classmethod
    def empty(cls) -> TeacherCache:
        return cls([], np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32))

    def merged(self, keys: list[str], desc: np.ndarray, desc_flip: np.ndarray) -> TeacherCache:
        known = self.index()
        new = [i for i, k in enumerate(keys) if k not in known]
        return TeacherCache(
            self.keys + [keys[i] for i in new],
            np.concatenate([self.desc, desc[new]]),
            np.concatenate([self.desc_flip, desc_flip[new]]),
        )


def reference_cache(path: Path | None = None) -> TeacherCache:
    """The shipped reference descriptors, re-keyed by the hash of each image they were computed from."""
    path = path or teacher_reference()
    root = shared_data()
    with np.load(path) as z:
        paths, desc, desc_flip = list(z["paths"]), z["desc"], z["desc_flip"]
    keys = [sha256_file(root / p) for p in paths]
    return TeacherCache(keys, desc.astype(np.float32), desc_flip.astype(np.float32))


def teacher_embed(images: list[Path], cache_path: Path, progress: bool = True) -> tuple[TeacherCache, int]:
    """Make sure every image has teacher descriptors in the cache; returns the cache and how many were computed.

    The cache starts from the shipped reference rows when it does not exist yet, so only new images cost dlib time.
    """
    from tqdm import tqdm

    if cache_path.exists():
        cache = TeacherCache.load(cache_path)
    elif teacher_reference().exists():
        cache = reference_cache()
    else:
        cache = TeacherCache.empty()
    known = cache.index()
    hashes = [sha256_file(p) for p in images]
    todo = [(p, h) for p, h in zip(images, hashes, strict=True) if h not in known]
    if todo:
        teacher = DlibTeacher()
        keys, d, df = [], [], []
        for p, h in tqdm(todo, desc="teacher (dlib)", unit="img", disable=not progress):
            a, b, _ = teacher.describe_file(p)
            keys.append(h), d.append(a), df.append(b)
        cache = cache.merged(keys, np.stack(d), np.stack(df))
    cache.save(cache_path)
    return cache, len(todo)
