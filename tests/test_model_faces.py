"""model.faces: bytes -> decode -> detect -> align -> embed, end to end on real photos (fresh weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import photo
from test_model_bundle import calibrated_net

from model.align import align_face
from model.bundle import bundle_from_model, save_bundle
from model.decode import DecodeLimits, read_image_file
from model.errors import EmptyImage, ImageTooLarge, UnreadableImage
from model.faces import GOOD_FACE_SIZE, FacePipeline, load_pipeline
from model.mobilenet import ModelConfig


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> FacePipeline:
    config = ModelConfig()
    path = tmp_path_factory.mktemp("faces") / "fresh.pt"
    save_bundle(bundle_from_model(calibrated_net(config), config, {"model_version": "fresh-faces"}), path)
    return load_pipeline(str(path))


def test_load_pipeline_uses_the_given_weights(pipe):
    assert pipe.embedder.model_version == "fresh-faces"
    assert pipe.embedder.flip and pipe.limits == DecodeLimits()


def test_every_face_is_aligned_and_embedded_largest_first(pipe):
    rel = "multi/obama_and_biden.jpg"
    faces = pipe.faces(photo(rel).read_bytes())
    assert len(faces) == 3
    assert [f.size for f in faces] == sorted((f.size for f in faces), reverse=True)
    image = read_image_file(str(photo(rel)))
    for f in faces:
        assert f.crop.shape == (112, 112, 3) and f.crop.dtype == np.uint8
        assert np.array_equal(f.crop, align_face(image, f.landmarks))
        assert f.embedding.shape == (128,) and abs(np.linalg.norm(f.embedding) - 1) < 1e-5
        # embedded in one batch, the same as each crop alone
        np.testing.assert_allclose(f.embedding, pipe.embedder.embed(f.crop)[0], atol=1e-5)
    assert float(faces[0].embedding @ faces[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert float(faces[0].embedding @ faces[1].embedding) < 0.999


def test_embed_false_skips_the_network(pipe):
    faces = pipe.faces(photo("obama2.jpg").read_bytes(), embed=False)
    assert len(faces) == 1 and faces[0].embedding is None


def test_no_face_is_an_empty_list(pipe):
    assert pipe.faces(photo("nonface/chelsea_cat.jpg").read_bytes()) == []


@pytest.mark.parametrize(
    ("rel", "error"),
    [
        ("edge/bad/truncated.jpg", UnreadableImage),
        ("edge/bad/not_an_image.jpg", UnreadableImage),
        ("edge/bad/empty.jpg", EmptyImage),
        ("edge/bad/bomb_20000x20000.png", ImageTooLarge),
    ],
)
def test_bad_files_raise_typed_errors(pipe, rel, error):
    with pytest.raises(error):
        pipe.faces(photo(rel).read_bytes())


def test_the_pipeline_applies_its_decode_limits(pipe):
    strict = FacePipeline(pipe.embedder, pipe.detector, DecodeLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLarge):
        strict.faces(photo("edge/obama_4000px.jpg").read_bytes())


def test_quality_penalises_small_faces_and_summary_is_json(pipe):
    (tiny,) = pipe.faces(photo("edge/obama_tiny_face.jpg").read_bytes())
    (large,) = pipe.faces(photo("obama.jpg").read_bytes())
    assert tiny.quality == pytest.approx(tiny.score * tiny.size / GOOD_FACE_SIZE, abs=1e-4)
    assert tiny.quality < 0.4
    assert large.size > GOOD_FACE_SIZE and large.quality == pytest.approx(large.score, abs=1e-4)
    summary = json.loads(json.dumps(large.summary()))
    assert set(summary) == {"box", "score", "size", "quality", "landmarks"}
    assert len(summary["box"]) == 4 and np.array(summary["landmarks"]).shape == (5, 2)
