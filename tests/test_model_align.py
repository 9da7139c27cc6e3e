"""model.align: the 5-point similarity warp puts the eyes, nose and mouth on the ArcFace template."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageDraw

from model.align import ARCFACE_TEMPLATE, CROP_SIZE, align_face, project_landmarks, similarity_to_template
from model.decode import read_image_file
from model.detect import FaceDetector

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
SINGLE = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama4.jpg", "biden.jpg", "biden2.jpg"]


def similar(points: np.ndarray, scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return scale * points @ rot.T + np.array(shift)


def dotted_image(landmarks: np.ndarray, radius: float, size: tuple[int, int] = (640, 640)) -> Image.Image:
    """Grey picture with a coloured disc centred on each landmark (continuous coordinates, pixel corners at
    integers, as Pillow's transforms use them)."""
    assert (landmarks > radius).all() and (landmarks < np.array(size) - radius).all()
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for (x, y), colour in zip(landmarks, COLOURS, strict=True):
        draw.ellipse([x - radius - 0.5, y - radius - 0.5, x + radius - 0.5, y + radius - 0.5], fill=colour)
    return img


def dot_centres(crop: np.ndarray) -> np.ndarray:
    """Centroid of each colour's pixels in the crop, in the same continuous coordinates
    (pixel centre = i + 0.5)."""
    centres = []
    for colour in COLOURS:
        near = np.abs(crop.astype(int) - np.array(colour)).sum(-1) < 90
        ys, xs = np.nonzero(near)
        assert len(xs) >= 5, f"dot {colour} not found in the crop"
        centres.append((xs.mean() + 0.5, ys.mean() + 0.5))
    return np.array(centres)


@pytest.mark.parametrize(
    ("scale", "degrees", "shift"), [(2.5, 20.0, (310.0, 170.0)), (4.0, -35.0, (150.0, 200.0))]
)
def test_exact_similarity_maps_the_landmarks_onto_the_template(scale, degrees, shift):
    landmarks = similar(ARCFACE_TEMPLATE, scale, degrees, shift)
    np.testing.assert_allclose(project_landmarks(landmarks), ARCFACE_TEMPLATE, atol=1e-6)
    tform = similarity_to_template(landmarks)
    assert tform.scale == pytest.approx(1 / scale)
    assert math.degrees(tform.rotation) == pytest.approx(-degrees)


@pytest.mark.parametrize(
    ("scale", "degrees", "shift"), [(2.5, 20.0, (310.0, 170.0)), (4.0, -35.0, (150.0, 200.0))]
)
def test_align_face_puts_each_point_of_the_picture_on_its_template_point(scale, degrees, shift):
    landmarks = similar(ARCFACE_TEMPLATE, scale, degrees, shift)
    crop = align_face(dotted_image(landmarks, radius=2.5 * scale), landmarks)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(dot_centres(crop), ARCFACE_TEMPLATE, atol=0.75)


def test_other_crop_sizes_scale_the_template():
    landmarks = similar(ARCFACE_TEMPLATE, 3.0, 10.0, (250.0, 200.0))
    crop = align_face(dotted_image(landmarks, radius=7.5), landmarks, size=224)
    assert crop.shape == (224, 224, 3)
    np.testing.assert_allclose(dot_centres(crop), ARCFACE_TEMPLATE * 2, atol=1.0)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.mark.parametrize("rel", SINGLE)
def test_real_faces_land_on_the_template(detector, rel):
    """Detect, align, then detect again on the crop (on a grey border, for context): the eyes of the
    aligned face are where the template puts them."""
    image = read_image_file(str(photo(rel)))
    (face,) = detector.detect(image)
    crop = align_face(image, face.landmarks)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    projected = project_landmarks(face.landmarks)
    assert np.abs(projected[:2] - ARCFACE_TEMPLATE[:2]).max() < 3.5  # eyes
    assert np.abs(projected - ARCFACE_TEMPLATE).max() < 7.0  # a face's shape never fits the template exactly
    pad = 32
    canvas = Image.new("RGB", (CROP_SIZE + 2 * pad,) * 2, (128, 128, 128))
    canvas.paste(Image.fromarray(crop), (pad, pad))
    again = detector.detect(canvas)
    assert len(again) == 1
    found = again[0].landmarks - pad
    assert np.abs(found[:2] - ARCFACE_TEMPLATE[:2]).max() < 4.0  # eyes
    assert np.abs(found - ARCFACE_TEMPLATE).max() < 7.0
    assert np.abs(found - projected).max() < 3.0  # the warp put the landmarks where the transform says
