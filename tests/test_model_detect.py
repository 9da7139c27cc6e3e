"""model.detect: MTCNN with the project's score and size floors, on the real test photos."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PHOTOS, photo

from model.decode import read_image_file
from model.detect import DetectedFace, DetectorConfig, FaceDetector, choose_face, face_at
from model.errors import MultipleFaces, NoFaceFound

SINGLE = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama4.jpg", "biden.jpg", "biden2.jpg"]
EDGE = sorted(p.name for p in (PHOTOS / "edge").iterdir() if p.is_file() and p.suffix != ".md")
MULTI = {"multi/obama_and_biden.jpg": 3, "multi/two_people.jpg": 2, "multi/kit_with_rose.jpg": 2}
NONFACE = sorted(f"nonface/{p.name}" for p in (PHOTOS / "nonface").iterdir())


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def detect(detector: FaceDetector, rel: str) -> list[DetectedFace]:
    return detector.detect(read_image_file(str(photo(rel))))


def test_the_edge_folder_is_what_the_counts_below_assume():
    assert len(EDGE) == 10 and "obama_tiny_face.jpg" in EDGE and len(NONFACE) == 4


@pytest.mark.parametrize(
    ("rel", "expected"),
    [(r, 1) for r in SINGLE]
    + [(f"edge/{r}", 1) for r in EDGE]
    + list(MULTI.items())
    + [(r, 0) for r in NONFACE],
)
def test_face_counts_on_the_test_photos(detector, rel, expected):
    img = read_image_file(str(photo(rel)))
    faces = detector.detect(img)
    assert len(faces) == expected, [(round(f.score, 3), round(f.size)) for f in faces]
    for f in faces:
        assert f.score >= detector.config.min_score and f.size >= detector.config.min_size
        left, top, right, bottom = f.box
        assert -5 <= left < right <= img.width + 5 and -5 <= top < bottom <= img.height + 5
        assert f.landmarks.shape == (5, 2)
        # eyes above the nose above the mouth, left eye left of the right eye, all inside the box
        (lex, ley), (rex, rey), (_, ny), (_, lmy), (_, rmy) = f.landmarks
        assert lex < rex and max(ley, rey) < ny < min(lmy, rmy)
        assert (left <= f.landmarks[:, 0]).all() and (f.landmarks[:, 0] <= right).all()
        assert (top <= f.landmarks[:, 1]).all() and (f.landmarks[:, 1] <= bottom).all()
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)  # largest first


def test_obama_and_biden_finds_obama_biden_and_the_child(detector):
    obama, biden, child = detect(detector, "multi/obama_and_biden.jpg")
    centre = {
        name: ((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2)
        for name, f in (("obama", obama), ("biden", biden), ("child", child))
    }
    assert centre["biden"][0] < centre["obama"][0]  # Biden stands left of Obama
    assert centre["child"][0] > 1500 and centre["child"][1] > 1000  # the child in the lower right corner
    assert child.size < min(obama.size, biden.size)


def test_tiny_face_is_found_at_its_real_size(detector):
    (face,) = detect(detector, "edge/obama_tiny_face.jpg")
    assert 20 <= face.width <= 32


def test_large_photo_boxes_come_back_in_original_coordinates(detector):
    """obama_4000px.jpg is obama4.jpg upscaled 4000/1480: detected on a 1280 px copy, the box must be scaled
    back."""
    (big,) = detect(detector, "edge/obama_4000px.jpg")
    (small,) = detect(detector, "obama4.jpg")
    assert 900 < big.width < 1000
    scale = 4000 / 1480
    np.testing.assert_allclose(np.array(big.box), np.array(small.box) * scale, atol=0.02 * big.width)
    np.testing.assert_allclose(big.landmarks, small.landmarks * scale, atol=0.02 * big.width)


@pytest.mark.parametrize("size", [(1, 1), (5, 5), (300, 19), (1280, 19), (1, 20000), (20000, 1)])
def test_images_too_small_to_hold_a_face_have_none(detector, size):
    """Below MTCNN's smallest face (20 px, counted after large photos are shrunk to 1280 px) its image pyramid is
    empty and facenet-pytorch raises: these images simply hold no face."""
    from PIL import Image

    assert detector.detect(Image.new("RGB", size, (128, 128, 128))) == []
    assert detector.detect_batch([Image.new("RGB", size), read_image_file(str(photo("obama.jpg")))])[0] == []


def test_batch_detection_matches_one_by_one_and_keeps_the_order(detector):
    rels = ["edge/obama_grey.jpg", "edge/obama_tiny_face.jpg", "nonface/coffee.jpg", "edge/obama.webp"]
    images = [read_image_file(str(photo(r))) for r in rels]
    batched = detector.detect_batch(images)
    assert [len(b) for b in batched] == [1, 1, 0, 1]
    for img, faces in zip(images, batched, strict=True):
        alone = detector.detect(img)
        for a, b in zip(faces, alone, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=0.5)


def test_min_score_and_min_size_decide_what_counts():
    """The raw MTCNN output on obama.jpg has a second, weaker box (0.815); the 0.95 floor removes it."""
    loose = FaceDetector(DetectorConfig(min_score=0.5))
    img = read_image_file(str(photo("obama.jpg")))
    assert len(loose.detect(img)) == 2
    strict_size = FaceDetector(DetectorConfig(min_size=30.0))
    assert strict_size.detect(read_image_file(str(photo("edge/obama_tiny_face.jpg")))) == []


def _face(box) -> DetectedFace:
    return DetectedFace(box=box, score=0.99, landmarks=np.zeros((5, 2)))


def test_choose_face_policies():
    big, small = _face((0, 0, 100, 100)), _face((200, 0, 250, 50))
    assert choose_face([small]) is small
    assert choose_face([big, small], "largest") is big
    with pytest.raises(MultipleFaces, match="2 faces"):
        choose_face([big, small])
    with pytest.raises(NoFaceFound):
        choose_face([])
    assert MultipleFaces.status == NoFaceFound.status == 422


def test_face_at_picks_the_best_overlap():
    a, b = _face((0, 0, 100, 100)), _face((200, 0, 300, 100))
    assert face_at([a, b], (190, 10, 290, 110)) is b
    assert face_at([a, b], (10, 0, 100, 90)) is a
    with pytest.raises(NoFaceFound):
        face_at([a, b], (500, 500, 600, 600))
    with pytest.raises(NoFaceFound):
        face_at([], (0, 0, 10, 10))


def test_detected_face_geometry():
    f = _face((10.0, 20.0, 50.0, 100.0))
    assert (f.width, f.height, f.size, f.area) == (40.0, 80.0, 40.0, 3200.0)
