"""5-point similarity alignment onto one fixed 112x112 template.

Training crops and serving crops both come through ``align_face``, so the network always sees a face laid
out the same way. The template is the widely used ArcFace one (eyes, nose tip, mouth corners).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

CROP_SIZE = 112
# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_to_template(landmarks: np.ndarray, size: int = CROP_SIZE) -> SimilarityTransform:
    """Least-squares (Umeyama) similarity mapping image landmarks onto the template scaled to ``size``."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = ARCFACE_TEMPLATE * (size / CROP_SIZE)
    return SimilarityTransform.from_estimate(src, dst)


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Warp ``image`` so ``landmarks`` land on the template; returns a ``size`` x ``size`` x 3 uint8 array.

    Pillow samples only the output pixels, so aligning a face in a 9-Mpx photo costs the same as in a small
    one and never copies the whole image.
    """
    tform = similarity_to_template(landmarks, size)
    inv = tform.inverse.params  # output -> input, as Pillow's affine transform expects
    coeffs = (inv[0, 0], inv[0, 1], inv[0, 2], inv[1, 0], inv[1, 1], inv[1, 2])
    crop = image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.uint8)


def project_landmarks(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Where ``landmarks`` land in the aligned crop (used by tests and quality checks)."""
    return similarity_to_template(landmarks, size)(np.asarray(landmarks, dtype=np.float64).reshape(5, 2))
