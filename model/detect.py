"""Face detection: facenet-pytorch's MTCNN (weights bundled in the wheel) -> boxes, scores, 5 landmarks.

Large photos are detected on a downscaled copy (MTCNN's cost grows with pixels, its accuracy does not) and the
coordinates scaled back, so alignment crops from the full-resolution original.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.errors import MultipleFaces, NoFaceFound


@dataclass(frozen=True)
class DetectorConfig:
    """MTCNN settings. ``min_score`` and ``min_size`` decide what counts as a face at all."""

    max_side: int = 1280  # photos larger than this are detected on a downscaled copy
    min_face_size: int = 20  # smallest face MTCNN's image pyramid looks for, in detection pixels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    min_score: float = 0.95  # weaker boxes (0.8-0.9 on posters, sleeves, ears) are not faces
    min_size: float = 20.0  # smallest accepted box side, in original pixels


@dataclass(frozen=True)
class DetectedFace:
    """One face in original-image pixel coordinates."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    score: float
    landmarks: np.ndarray = field(repr=False)  # (5, 2): eyes, nose, mouth corners (x, y)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def size(self) -> float:
        """The shorter side of the box: the simplest quality signal (tiny faces embed poorly)."""
        return min(self.width, self.height)

    @property
    def area(self) -> float:
        return self.width * self.height


class FaceDetector:
    """Thread-safe wrapper around one MTCNN instance (torch modules are safe for concurrent inference)."""

    def __init__(self, config: DetectorConfig | None = None, device: str = "cpu") -> None:
        from facenet_pytorch import MTCNN  # heavy import, deferred until a detector is needed

        self.config = config or DetectorConfig()
        self._mtcnn = MTCNN(
            keep_all=True,
            min_face_size=self.config.min_face_size,
            thresholds=list(self.config.thresholds),
            device=device,
            select_largest=False,
        )

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """All faces that pass ``min_score`` and ``min_size``, largest first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[Image.Image]) -> list[list[DetectedFace]]:
        """Detect in several images at once; MTCNN batches only images of equal size, so group by size."""
        results: list[list[DetectedFace]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.size, []).append(i)
        for size, idx in groups.items():
            scale = min(1.0, self.config.max_side / max(size))
            small = [self._downscale(images[i], scale) for i in idx]
            if min(small[0].size) < self.config.min_face_size:
                continue  # no face that small is looked for (MTCNN's pyramid would be empty: it raises)
            arr = np.stack([np.asarray(im, dtype=np.uint8) for im in small])
            with torch.inference_mode():
                boxes, probs, points = self._mtcnn.detect(arr, landmarks=True)
            for j, i in enumerate(idx):
                results[i] = self._faces(boxes[j], probs[j], points[j], scale)
        return results

    @staticmethod
    def _downscale(image: Image.Image, scale: float) -> Image.Image:
        if scale >= 1.0:
            return image
        w, h = image.size
        return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)

    def _faces(self, boxes, probs, points, scale: float) -> list[DetectedFace]:
        if boxes is None:
            return []
        faces = []
        for box, prob, pts in zip(boxes, probs, points, strict=True):
            face = DetectedFace(
                box=tuple(float(v) / scale for v in box),
                score=float(prob),
                landmarks=np.asarray(pts, dtype=np.float64) / scale,
            )
            if face.score >= self.config.min_score and face.size >= self.config.min_size:
                faces.append(face)
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


def choose_face(faces: list[DetectedFace], policy: str = "single") -> DetectedFace:
    """Pick one face: ``single`` refuses several, ``largest`` takes the biggest box."""
    if not faces:
        raise NoFaceFound("no face was found in the image")
    if policy == "largest" or len(faces) == 1:
        return faces[0]
    raise MultipleFaces(f"{len(faces)} faces were found; say which one (largest, or a box)")


MIN_POINTED_IOU = 0.3  # a box given by a caller names the detected face it overlaps more than this


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(left, top, right, bottom)`` boxes (0 when they do not meet)."""
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def face_at(faces: list[DetectedFace], box: tuple[float, float, float, float]) -> DetectedFace:
    """The detected face that overlaps ``box`` best (intersection over union), for callers who point at one."""
    if not faces:
        raise NoFaceFound("no face was found in the image")
    best = max(faces, key=lambda f: box_iou(f.box, box))
    if box_iou(best.box, box) <= MIN_POINTED_IOU:
        raise NoFaceFound(f"no detected face overlaps the box {list(box)}")
    return best
