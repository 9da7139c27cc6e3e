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


def models_dir() -> Path:
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
        models = models_dir()
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

    def face_rect(self, a: np.ndarray, box: tuple[int, int, int, int] | None = None):
        """The face box the descriptor is computed in: ``box`` when known, else found as in ``describe_canvas``."""
        dlib = self._dlib
        if box is not None:
            return dlib.rectangle(*(int(v) for v in box))
        dets = self.detector(a, 1)
        if not dets:
            return dlib.rectangle(*FALLBACK_BOX)
        c = a.shape[1] / 2.0
        r = min(dets, key=lambda r: (r.center().x - c) ** 2 + (r.center().y - c) ** 2)
        h, w = a.shape[:2]
        return dlib.rectangle(max(r.left(), 0), max(r.top(), 0), min(r.right(), w), min(r.bottom(), h))

    def chip_transform(self, a: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """3x3 map from canvas pixels to the 150x150 chip dlib's descriptor would see (5-point alignment)."""
        from training.views import chip_matrix

        d = self._dlib.get_face_chip_details(self.shape(a, self.face_rect(a, box)), 150, 0.25)
        r = d.rect
        return chip_matrix((r.left(), r.top(), r.right(), r.bottom()), d.angle)

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


def teacher_chip_matrices(paths: list[Path], cache_path: Path, progress: bool = True) -> np.ndarray:
    """(N, 3, 3) maps from each source photo's pixels to its teacher chip, cached by path in ``cache_path``.

    The face box comes from the shipped reference descriptors where the photo is one of theirs (so the chip is
    the one their descriptor was computed on), else from dlib's detector as ``teacher-embed`` would find it.
    """
    from tqdm import tqdm

    keys = [str(p.resolve()) for p in paths]
    cached: dict[str, np.ndarray] = {}
    if cache_path.exists():
        with np.load(cache_path) as z:
            cached = dict(zip(z["keys"], z["matrices"], strict=True))
    todo = [(k, p) for k, p in zip(keys, paths, strict=True) if k not in cached]
    if todo:
        boxes: dict[str, tuple] = {}
        if teacher_reference().exists():
            with np.load(teacher_reference()) as z:
                root = shared_data().resolve()
                boxes = {str(root / p): tuple(b) for p, b in zip(z["paths"], z["box"], strict=True)}
        teacher = DlibTeacher()
        offset = np.array([[1.0, 0, OFFSET], [0, 1.0, OFFSET], [0, 0, 1.0]])  # source -> canvas pixels
        for key, path in tqdm(todo, desc="teacher chips", unit="img", disable=not progress):
            with Image.open(path) as img:
                canvas = teacher.canvas(img)
            cached[key] = teacher.chip_transform(canvas, boxes.get(key)) @ offset
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".tmp.npz")
        np.savez(tmp, keys=np.array(list(cached)), matrices=np.stack(list(cached.values())))
        tmp.replace(cache_path)
    return np.stack([cached[k] for k in keys])
