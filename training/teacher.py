"""The distillation teacher: dlib's ResNet face descriptor, computed once per image and cached by image hash.

The method is the one in ``shared/data/teacher/SOURCE.md`` (crop pasted at (45, 45) on a 250x250 grey
canvas, HOG detector with one upsampling, face nearest the centre, fixed fallback box, 5-point chip, no jitter;
the mirrored canvas gives ``desc_flip``), so our own descriptors match the shipped reference rows. dlib is an
optional extra (``pip install .[teacher]``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.files import make_parent
from training.dlib_resnet import CHIP_SIZE
from training.paths import shared_data, teacher_reference

CANVAS, OFFSET, GREY = 250, 45, (128, 128, 128)
CROP = 160  # the shared data's face crops: pasted at OFFSET, the face sits where dlib's frame had it
SAVE_EVERY_S = 60.0  # teacher-embed rewrites its cache this often while it works (and at the end)
CHIP_PADDING = 0.25  # dlib's default for its 150 px descriptor chips
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
FALLBACK_BOX = (50, 50, 200, 200)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def models_dir() -> Path:
    # ``import face_recognition_models`` needs pkg_resources (gone in setuptools >= 82): find the files instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dlib teacher needs the optional extra: pip install 'visage[teacher]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def teacher_network():
    """dlib's descriptor network as a PyTorch module in eval mode (``training.dlib_resnet``), from dlib's file."""
    from training.dlib_resnet import load_dlib_resnet

    return load_dlib_resnet(models_dir() / RESNET_FILE)


class DlibTeacher:
    """dlib's 128-d descriptor, plain and mirrored: dlib finds the face and its 5 landmarks and cuts the chip;
    the descriptor network runs in PyTorch (``training.dlib_resnet``, dlib's weights, the same numbers to
    1e-5), batched: ~6 ms a chip instead of dlib's ~100 ms on these CPUs."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise RuntimeError("the dlib teacher needs the optional extra: pip install 'visage[teacher]'") from exc
        models = models_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = None

    @property
    def net(self):
        if self._net is None:
            self._net = teacher_network()
        return self._net

    def canvas(self, image: Image.Image) -> np.ndarray:
        canvas = Image.new("RGB", (CANVAS, CANVAS), GREY)
        canvas.paste(image.convert("RGB"), (OFFSET, OFFSET))
        return np.ascontiguousarray(np.asarray(canvas, dtype=np.uint8))

    def chips(self, a: np.ndarray, fallback_box: tuple[int, int, int, int] = FALLBACK_BOX,
              ) -> tuple[np.ndarray, np.ndarray, bool]:
        """The 150x150 chips dlib describes for a canvas and its mirror image, and whether the box is the
        fallback (no face detected)."""
        dlib = self._dlib
        r, fallback = self.locate(a, fallback_box)
        chip = dlib.get_face_chip(a, self.shape(a, r), CHIP_SIZE, CHIP_PADDING)
        af = np.ascontiguousarray(a[:, ::-1, :])
        w = a.shape[1] - 1
        rf = dlib.rectangle(w - r.right(), r.top(), w - r.left(), r.bottom())
        return chip, dlib.get_face_chip(af, self.shape(af, rf), CHIP_SIZE, CHIP_PADDING), fallback

    def describe_chips(self, chips: np.ndarray, batch: int = 64) -> np.ndarray:
        """(n, 150, 150, 3) uint8 chips -> (n, 128) float32 descriptors."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(chips), batch):
                x = torch.from_numpy(np.ascontiguousarray(chips[i : i + batch])).permute(0, 3, 1, 2).float()
                out.append(self.net(x.contiguous(memory_format=torch.channels_last)).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 128), np.float32)

    def describe_canvas(self, a: np.ndarray, fallback_box: tuple[int, int, int, int] = FALLBACK_BOX,
                        ) -> tuple[np.ndarray, np.ndarray, bool]:
        chip, chip_flip, fallback = self.chips(a, fallback_box)
        desc, desc_flip = self.describe_chips(np.stack([chip, chip_flip]))
        return desc, desc_flip, fallback

    def locate(self, a: np.ndarray, fallback_box: tuple[int, int, int, int] = FALLBACK_BOX) -> tuple[object, bool]:
        """(dlib rectangle, fallback): the HOG face nearest the centre (one upsampling), clipped to the canvas,
        or ``fallback_box`` when there is none."""
        dlib = self._dlib
        dets = self.detector(a, 1)
        if not dets:
            return dlib.rectangle(*fallback_box), True
        c = a.shape[1] / 2.0
        r = min(dets, key=lambda r: (r.center().x - c) ** 2 + (r.center().y - c) ** 2)
        h, w = a.shape[:2]
        return dlib.rectangle(max(r.left(), 0), max(r.top(), 0), min(r.right(), w), min(r.bottom(), h)), False

    def face_rect(self, a: np.ndarray, box: tuple[int, int, int, int] | None = None):
        """The face box the descriptor is computed in: ``box`` when known, else ``locate``'s."""
        return self._dlib.rectangle(*(int(v) for v in box)) if box is not None else self.locate(a)[0]

    def chip_transform(self, a: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """3x3 map from canvas pixels to the 150x150 chip dlib's descriptor would see (5-point alignment)."""
        from training.views import chip_matrix

        d = self._dlib.get_face_chip_details(self.shape(a, self.face_rect(a, box)), CHIP_SIZE, CHIP_PADDING)
        r = d.rect
        return chip_matrix((r.left(), r.top(), r.right(), r.bottom()), d.angle)

    def describe_photo(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray, bool]:
        """A photo of any size (an ORL face, a Yale frame), not one of the shared data's 160 px crops (those go
        on the canvas): dlib's detector runs on the photo itself, and the whole frame is the box when it finds no
        face. -> (desc, desc_flip, fallback)."""
        a = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w = a.shape[:2]
        return self.describe_canvas(a, (0, 0, w - 1, h - 1))

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
        make_parent(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, keys=np.array(self.keys), desc=self.desc, desc_flip=self.desc_flip)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        """The cache at ``path``; a file that is not one (the shipped reference npz, a damaged zip, a text file)
        is one ``ValueError`` naming it. numpy's KeyError and BadZipFile were tracebacks, and its advice to load
        a text file with allow_pickle is not for our users (no pickles are ever loaded)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [name for name in ("keys", "desc", "desc_flip") if name not in z.files]
                if missing:
                    raise KeyError(f"no {' or '.join(repr(m) for m in missing)} array")
                cache = cls(list(z["keys"]), z["desc"], z["desc_flip"])
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            # (TypeError: a lone .npy array, not an archive; ValueError: a pickle, text, an object array)
            why = exc.args[0] if isinstance(exc, KeyError) else "not an npz archive of arrays, or a damaged one"
            raise ValueError(f"{path} is not a teacher cache written by `visage teacher-embed` ({why}): give "
                             "another cache, or delete it") from None
        if not len(cache.keys) == len(cache.desc) == len(cache.desc_flip):
            raise ValueError(f"{path} is a damaged teacher cache: {len(cache.keys)} keys for {len(cache.desc)} and "
                             f"{len(cache.desc_flip)} descriptors; delete it")
        return cache

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


def teacher_embed(images: list[Path], cache_path: Path, progress: bool = True) -> EmbedResult:
    """Make sure every image has teacher descriptors in the cache; the result says how many were computed, how
    many of those fell back to the central box, and which images could not be described (path -> reason:
    listed, and the others go on).

    The cache starts from the shipped reference rows when it does not exist yet, so only new images cost dlib time.
    """
    return _embed(images, cache_path, progress)


def teacher_vectors(images: list[Path], cache_path: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(desc, desc_flip) of each image, in order, computing and caching only what the cache lacks."""
    result = _embed(images, cache_path, progress)
    cache, hashes, failed = result.cache, result.hashes, result.failed
    if failed:
        path, reason = next(iter(failed.items()))
        raise ValueError(f"{len(failed)} images could not be read by the teacher (e.g. {path}: {reason})")
    rows = np.array([cache.index()[h] for h in hashes], dtype=np.int64)
    return cache.desc[rows], cache.desc_flip[rows]


@dataclass
class EmbedResult:
    cache: TeacherCache
    computed: int  # descriptors computed now (the others were cached, or failed)
    hashes: list[str]  # each image's sha256, in order
    failed: dict[str, str]  # path -> reason
    fallbacks: int  # computed ones where dlib found no face: described in the fixed central box


def _embed(images: list[Path], cache_path: Path, progress: bool) -> EmbedResult:
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
    failed: dict[str, str] = {}
    fallbacks = 0
    saved = time.monotonic()
    if todo:
        teacher = DlibTeacher()
        with tqdm(total=len(todo), desc="teacher (dlib)", unit="img", disable=not progress) as bar, \
                _saved_on_interrupt(lambda: cache, cache_path):
            for start in range(0, len(todo), 64):
                keys, chips = [], []
                for p, h in todo[start : start + 64]:
                    try:
                        with Image.open(p) as img:
                            if img.size != (CROP, CROP):  # the canvas puts only a 160 px crop's face in place
                                raise ValueError(
                                    f"the teacher takes {CROP}x{CROP} face crops (the shared data's format, "
                                    f"teacher/SOURCE.md); this image is {img.size[0]}x{img.size[1]}"
                                )
                            chip, chip_flip, fallback = teacher.chips(teacher.canvas(img))
                        chips.extend([chip, chip_flip])
                        keys.append(h)
                        fallbacks += fallback
                    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # empty, truncated, no image
                        failed[str(p)] = str(exc)
                if keys:
                    desc = teacher.describe_chips(np.stack(chips))
                    cache = cache.merged(keys, desc[0::2], desc[1::2])
                if time.monotonic() - saved > SAVE_EVERY_S:  # an interruption loses at most a minute's work
                    cache.save(cache_path)
                    saved = time.monotonic()
                bar.update(min(64, len(todo) - start))
    cache.save(cache_path)
    return EmbedResult(cache, len(todo) - len(failed), hashes, failed, fallbacks)


@contextmanager
def _saved_on_interrupt(current: Callable[[], TeacherCache], path: Path) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, which the command turns into one) keeps the descriptors computed so far: a re-run
    computes only the rest (they were saved once a minute, so up to a minute of dlib time was lost). Nothing new,
    nothing written (not the whole reference cache)."""
    start = current()
    try:
        yield
    except KeyboardInterrupt:
        if current() is not start:
            current().save(path)
        raise


def teacher_chip_matrices(paths: list[Path], cache_path: Path, progress: bool = True) -> np.ndarray:
    """(N, 3, 3) maps from each source photo's pixels to its teacher chip, cached by path in ``cache_path``.

    The face box comes from the shipped reference descriptors where the photo is one of theirs (so the chip is
    the one their descriptor was computed on), else from dlib's detector as ``teacher-embed`` would find it.
    """
    from tqdm import tqdm

    from training.views import translation

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
        offset = translation(OFFSET, OFFSET)  # source -> canvas pixels
        for key, path in tqdm(todo, desc="teacher chips", unit="img", disable=not progress):
            with Image.open(path) as img:
                canvas = teacher.canvas(img)
            cached[key] = teacher.chip_transform(canvas, boxes.get(key)) @ offset
        save_chip_matrices(cache_path, list(cached), np.stack(list(cached.values())))
    return np.stack([cached[k] for k in keys])


def save_chip_matrices(cache_path: Path, keys: list[str], matrices: np.ndarray) -> None:
    """Write ``teacher_chip_matrices``' cache: keys are the photos' resolved paths (``str(path.resolve())``)."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + ".tmp.npz")
    np.savez(tmp, keys=np.array(keys), matrices=matrices)
    tmp.replace(cache_path)
