"""bytes -> decode -> detect -> align -> embed: the face pipeline shared by the CLI, the service and eval."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model.align import CROP_SIZE, align_face
from model.decode import DecodeLimits, decode_image
from model.detect import DetectedFace, FaceDetector
from model.embedder import Embedder

GOOD_FACE_SIZE = 80.0  # px; faces at least this large embed about as well as the training crops


@dataclass
class Face:
    """One detected, aligned and (optionally) embedded face."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)
    crop: np.ndarray = field(repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> float:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def quality(self) -> float:
        """0..1: detection confidence scaled down for small faces (the main cause of bad matches)."""
        return round(float(self.score) * min(1.0, self.size / GOOD_FACE_SIZE), 4)

    def summary(self) -> dict:
        return {
            "box": [round(v, 1) for v in self.box],
            "score": round(self.score, 4),
            "size": round(self.size, 1),
            "quality": self.quality,
            "landmarks": np.round(self.landmarks, 1).tolist(),
        }


def align_faces(image: Image.Image, detected: list[DetectedFace]) -> list[Face]:
    return [Face(d.box, d.score, d.landmarks, align_face(image, d.landmarks, CROP_SIZE)) for d in detected]


class FacePipeline:
    """Decode limits, one detector and one embedder, used together so every caller sees faces alike."""

    def __init__(self, embedder: Embedder, detector: FaceDetector, limits: DecodeLimits | None = None) -> None:
        self.embedder, self.detector, self.limits = embedder, detector, limits or DecodeLimits()

    def faces(self, data: bytes, embed: bool = True) -> list[Face]:
        """All faces in an image, largest first, each aligned and (by default) embedded in one batch."""
        image = decode_image(data, self.limits)
        faces = align_faces(image, self.detector.detect(image))
        if embed and faces:
            vectors = self.embedder.embed(np.stack([f.crop for f in faces]))
            for face, vec in zip(faces, vectors, strict=True):
                face.embedding = vec
        return faces


def load_pipeline(weights: str | None = None, flip: bool = True, limits: DecodeLimits | None = None,
                  backend: str = "onnx") -> FacePipeline:
    """The shipped default weights (or ``weights``), MTCNN with default settings, default decode limits,
    embedding through ONNX Runtime (same vectors as PyTorch, faster) unless ``backend="torch"``."""
    from model.bundle import load_bundle

    return FacePipeline(Embedder(load_bundle(weights), flip=flip, backend=backend), FaceDetector(), limits)
