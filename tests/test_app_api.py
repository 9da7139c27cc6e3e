"""The API in-process (FastAPI's TestClient) with a fake, instant face model: the contract of every endpoint,
the error shape of every bad input, auth, metrics and OpenAPI. The real model is exercised in test_app_e2e."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from app_helpers import BLUE, GREEN, RED, concurrently, fake_pipeline, png, write_locked
from fastapi import Request
from PIL import Image

from app import runtime as runtime_module
from app.api.deps import run_cpu
from app.logs import current_request_id
from app.main import create_app
from app.settings import Settings

with warnings.catch_warnings():  # starlette suggests httpx2, which this project does not use
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

KEY = "k-test"
PROTECTED = [("post", "/enroll"), ("post", "/verify"), ("post", "/identify"), ("post", "/compare"),
             ("post", "/embed"), ("get", "/subjects"), ("get", "/subjects/1"), ("patch", "/subjects/1"),
             ("delete", "/subjects/1"), ("delete", "/subjects/1/faces/1")]


def make_client(tmp_path, version: str = "fake-v1", **settings) -> TestClient:
    values = {"data_dir": tmp_path, "api_keys": KEY, **settings}
    app = create_app(Settings(**values), pipeline=fake_pipeline(version))
    return TestClient(app, headers={"X-API-Key": KEY} if values["api_keys"] else {})


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        assert c.app.state.runtime.wait_ready(30)
        yield c


def enroll(client: TestClient, image: bytes, **form) -> dict:
    r = client.post("/enroll", files={"image": ("x.png", image)}, data=form)
    assert r.status_code in (200, 201), r.text
    return r.json()


def is_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"], body


def test_enroll_is_idempotent_and_verify_uses_the_calibrated_threshold(client):
    first = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
    assert first.status_code == 201 and first.json()["created"] is True
    embedder = client.app.state.runtime.service.pipeline.embedder
    calls = embedder.calls
    again = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["face_id"] == first.json()["face_id"] and embedder.calls == calls  # model not run
    bob = enroll(client, png(BLUE), subject="bob", metadata=json.dumps({"team": "b"}))
    assert bob["subject"]["name"] == "bob" and bob["quality"] > 0.9

    same = client.post("/verify", files={"image": png(RED, width=200)}, data={"subject": "alice"}).json()
    assert same["match"] is True and same["similarity"] > 0.99 and same["threshold"] == 0.9
    assert same["far"] == "1e-3" and same["matched_face_id"] == first.json()["face_id"]
    other = client.post("/verify", files={"image": png(RED)}, data={"subject_id": bob["subject"]["id"]}).json()
    assert other["match"] is False and other["subject"] == bob["subject"]
    strict = client.post("/verify", files={"image": png(RED)}, data={"subject": "alice", "far": "1e-4"}).json()
    assert strict["threshold"] == 0.95 and strict["far"] == "1e-4"
    decimal = client.post("/verify", files={"image": png(RED)}, data={"subject": "alice", "far": "0.0001"}).json()
    assert decimal["threshold"] == 0.95 and decimal["far"] == "1e-4"  # the calibrated key, however it was written
    explicit = client.post("/verify", files={"image": png(BLUE)}, data={"subject": "alice", "threshold": "-1"})
    assert explicit.json()["match"] is True and explicit.json()["far"] is None


def test_identify_ranks_subjects_for_every_face_and_compare_needs_no_gallery(client):
    enroll(client, png(RED), subject="alice")
    enroll(client, png(BLUE), subject="bob")
    r = client.post("/identify", files={"image": png(BLUE, GREEN, RED)}, data={"k": "2"})
    faces = r.json()["faces"]
    assert [f["face"]["box"][0] for f in faces] == [20.0, 140.0, 260.0]
    assert faces[0]["match"] and faces[0]["best"]["name"] == "bob"
    assert [c["name"] for c in faces[0]["candidates"]] == ["bob", "alice"]
    assert faces[1]["match"] is False and faces[1]["best"] is None and len(faces[1]["candidates"]) == 2
    assert faces[2]["best"]["name"] == "alice"
    cmp = client.post("/compare", files={"image1": png(GREEN), "image2": png(GREEN, width=300)}).json()
    assert cmp["match"] is True and cmp["face1"]["box"] and cmp["model_version"] == "fake-v1"
    cmp = client.post("/compare", files={"image1": png(GREEN), "image2": png(RED, BLUE)},
                      data={"face2": "150,30,230,110"}).json()
    assert cmp["match"] is False and cmp["face2"]["box"][0] == 140.0
    emb = client.post("/embed", files={"image": png(RED, BLUE)}).json()
    assert emb["dim"] == 8 and len(emb["faces"]) == 2 and len(emb["faces"][0]["embedding"]) == 8
    assert client.post("/embed", files={"image": png()}).json()["faces"] == []


def test_photos_with_several_faces_need_a_choice(client):
    two = png(RED, BLUE)
    is_error(client.post("/enroll", files={"image": two}, data={"subject": "x"}), 422, "multiple_faces")
    largest = enroll(client, two, subject="x", face="largest")
    assert largest["box"][0] == 20.0
    boxed = enroll(client, two, subject="y", face="150, 30, 230, 110")
    assert boxed["box"][0] == 140.0
    # one face per image and subject: a retry pointing at the same face is idempotent, another face is refused
    again = client.post("/enroll", files={"image": two}, data={"subject": "y", "face": "145,25,235,115"})
    assert again.status_code == 200 and again.json()["face_id"] == boxed["face_id"]
    other = client.post("/enroll", files={"image": two}, data={"subject": "y", "face": "20,20,120,120"})
    is_error(other, 409, "image_already_enrolled")
    assert f"face {boxed['face_id']}" in other.json()["detail"]
    nowhere = client.post("/enroll", files={"image": two}, data={"subject": "y", "face": "500,0,600,50"})
    is_error(nowhere, 422, "no_face_found")  # as for a new image: the box points at no face at all
    assert client.post("/enroll", files={"image": two}, data={"subject": "y", "face": "largest"}).status_code == 200
    is_error(client.post("/enroll", files={"image": two}, data={"subject": "z", "face": "500,0,600,50"}),
             422, "no_face_found")
    is_error(client.post("/enroll", files={"image": two}, data={"subject": "z", "face": "3,2,1"}),
             422, "bad_parameter")
    # plain decimals only: float() read "1_50" as 150 and other scripts' digits as ours
    for box in ("1_50, 30, 230, 110", "\u0661\u0665\u0660, 30, 230, 110"):
        is_error(client.post("/enroll", files={"image": two}, data={"subject": "z", "face": box}), 422, "bad_parameter")
    assert enroll(client, two, subject="z", face="1.5e2, +30, 230., 110")["box"][0] == 140.0
    # /compare says which of its two selectors is wrong
    bad = client.post("/compare", files={"image1": two, "image2": two}, data={"face2": "1,2"})
    is_error(bad, 422, "bad_parameter")
    assert bad.json()["detail"].startswith("face2 must be"), bad.text
    is_error(client.post("/enroll", files={"image": png()}, data={"subject": "z"}), 422, "no_face_found")


def test_every_bad_input_is_a_4xx_json_error(tmp_path):
    with make_client(tmp_path, max_upload_bytes=50_000) as client:
        client.app.state.runtime.wait_ready(30)
        enroll(client, png(RED), subject="alice")
        pcx = io.BytesIO()
        Image.new("RGB", (50, 50)).save(pcx, "PCX")
        jpeg = png(RED, fmt="JPEG")
        cases = [
            (client.post("/enroll", files={"image": b""}, data={"subject": "a"}), 400, "empty_image"),
            (client.post("/enroll", files={"image": b"not an image"}, data={"subject": "a"}), 400,
             "unreadable_image"),
            (client.post("/enroll", files={"image": jpeg[: len(jpeg) // 2]}, data={"subject": "a"}), 400,
             "unreadable_image"),
            (client.post("/enroll", files={"image": pcx.getvalue()}, data={"subject": "a"}), 415,
             "unsupported_image_type"),
            (client.post("/enroll", files={"image": b"\0" * 60_000}, data={"subject": "a"}), 413, "image_too_large"),
            (client.post("/embed", content=b"x" * 1_300_000,
                         headers={"content-type": "multipart/form-data; boundary=b"}), 413, "request_too_large"),
            (client.post("/enroll", data={"subject": "a"}), 422, "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}), 422, "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}, data={"subject": "a", "subject_id": "1"}), 422,
             "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}, data={"subject": "a", "metadata": "[1"}), 422,
             "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}, data={"subject": "\x01"}), 422, "bad_parameter"),
            (client.post("/verify", files={"image": jpeg}, data={"subject": "nobody"}), 404, "subject_not_found"),
            (client.post("/verify", files={"image": jpeg}, data={"subject_id": "abc"}), 422, "bad_parameter"),
            (client.post("/verify", files={"image": jpeg}, data={"subject": "alice", "threshold": "2.5"}), 422,
             "bad_parameter"),
            (client.post("/verify", files={"image": jpeg}, data={"subject": "alice", "far": "0.5"}), 422,
             "bad_parameter"),
            (client.post("/identify", files={"image": jpeg}, data={"k": "0"}), 422, "bad_parameter"),
            (client.post("/identify", files={"image": png()}), 422, "no_face_found"),
            (client.get("/subjects", params={"limit": 10_000}), 422, "bad_parameter"),
            (client.get("/subjects/999"), 404, "subject_not_found"),
            (client.get("/subjects/abc"), 422, "bad_parameter"),
            (client.patch("/subjects/1", content=b"{bad", headers={"content-type": "application/json"}), 422,
             "bad_parameter"),
            (client.patch("/subjects/1", json={"nickname": "x"}), 422, "bad_parameter"),
            (client.delete("/subjects/1/faces/999"), 404, "face_not_found"),
            # ids past SQLite's signed 64-bit integers name no row: refused before the database sees them
            (client.post("/verify", files={"image": jpeg}, data={"subject_id": str(2**63)}), 422, "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}, data={"subject_id": str(10**25)}), 422, "bad_parameter"),
            (client.get(f"/subjects/{2**63}"), 422, "bad_parameter"),
            (client.delete(f"/subjects/{2**63}"), 422, "bad_parameter"),
            (client.delete(f"/subjects/1/faces/{10**20}"), 422, "bad_parameter"),
            (client.get("/subjects", params={"offset": 10**20}), 422, "bad_parameter"),
            (client.post("/verify", files={"image": jpeg}, data={"subject": "alice", "threshold": "nan"}), 422,
             "bad_parameter"),
            (client.post("/enroll", files={"image": jpeg}, data={"subject": "a", "metadata": '{"n": NaN}'}), 422,
             "bad_parameter"),
            *((client.post("/enroll", files={"image": jpeg}, data={"subject": name}), 422, "bad_parameter")
              # control, format, invisible-only (blank-looking letters and the braille blank too)
              for name in ("zero\x7fdel", "a\u202eb", "\u200b", "\u3164", "\u2800", "\u115f\u1160", "\u034f")),
            (client.get("/no/such/route"), 404, "not_found"),
            (client.put("/enroll"), 405, "method_not_allowed"),
        ]
        for response, status, code in cases:
            is_error(response, status, code)
        typo = client.get("/subjects", params={"limt": 5})
        is_error(typo, 422, "bad_parameter")
        assert "limt" in typo.json()["detail"]
        broken = client.post("/enroll", files={"image": jpeg}, data={"subject": "a", "metadata": "[1"})
        assert broken.json()["detail"].startswith("metadata: Invalid JSON")  # a JSON field, not the body
        json_type = {"Content-Type": "application/json"}
        garbled = client.patch("/subjects/1", content=b'{"name": x}', headers=json_type)
        is_error(garbled, 422, "bad_parameter")
        assert garbled.json()["detail"] == "body: not valid JSON at character 10 (Expecting value)"
        for body, said in ((b"[1]", "body: send a JSON object, not an array"), (b"7", "not a number"),
                           (b"null", "not null")):  # (the content type was right: it was told to set it)
            r = client.patch("/subjects/1", content=body, headers=json_type)
            is_error(r, 422, "bad_parameter")
            assert said in r.json()["detail"], r.text
        binary = client.patch("/subjects/1", content=b"\x18\x1d$\xff\xfe", headers=json_type)
        is_error(binary, 400, "bad_request")
        assert "could not be parsed" in binary.json()["detail"]
        # a 405 names every method of the path, the hidden HEAD routes beside GET ones included (RFC 9110 15.5.6)
        assert client.put("/enroll").headers["allow"] == "POST"
        assert client.options("/healthz").headers["allow"] == "GET, HEAD"
        assert client.post("/subjects/1").headers["allow"] == "DELETE, GET, HEAD, PATCH"
        nan = client.post("/verify", files={"image": jpeg}, data={"subject": "alice", "threshold": "inf"})
        assert "finite" in nan.json()["detail"]
        which = client.post("/compare", files={"image1": png(RED), "image2": png()})
        is_error(which, 422, "no_face_found")
        assert which.json()["detail"].startswith("image2: ")
        empty = client.post("/compare", files={"image1": ("a.png", b""), "image2": png(RED)})
        is_error(empty, 400, "empty_image")
        assert empty.json()["detail"] == "image1: a.png is empty"
        assert client.get("/subjects", params={"offset": 2**63 - 1}).json()["items"] == []


@pytest.mark.parametrize("name", ["\u5c71\u7530\u3000\u592a\u90ce", "Jean\u00a0Dupont",
                                  "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f469\u200d\U0001f4bb",
                                  "Jos\u00e9"])
def test_names_in_any_script_are_kept(client, name):
    """An ideographic or no-break space, a zero-width (non-)joiner inside a name, an accent: real names need
    them, and one enrolled before is found again by the same string."""
    first = enroll(client, png(RED), subject=name)
    assert first["subject"]["name"] == name
    assert enroll(client, png(BLUE), subject=name)["subject"]["id"] == first["subject"]["id"]


def test_names_that_look_the_same_are_one_subject(client):
    """A macOS folder name is NFD ("Jose" + a combining accent), a keyboard types NFC, a pasted name may end in a
    zero-width space or start with a byte-order mark: all four are the same subject, stored as NFC."""
    first = enroll(client, png(RED), subject="Jose\u0301")
    assert first["subject"]["name"] == "Jos\u00e9"
    for twin in ["Jos\u00e9", "Jos\u00e9\u200b", "\ufeffJose\u0301 "]:
        r = client.post("/verify", files={"image": ("x.png", png(RED))}, data={"subject": twin})
        assert r.status_code == 200 and r.json()["subject"]["id"] == first["subject"]["id"], (twin, r.text)
    assert enroll(client, png(BLUE), subject="Jos\u00e9\u200b")["subject"]["id"] == first["subject"]["id"]
    # any character that renders as nothing, at either end: a left-to-right mark, a soft hyphen, an invisible
    # operator, a combining grapheme joiner, a variation selector or tag after a letter (each made a new subject)
    for invisible in ["\u200f", "\u200e", "\u00ad", "\u2061", "\u180e", "\u034f", "\ufe0f", "\U000e0001"]:
        twin = enroll(client, png(BLUE), subject="Jos\u00e9" + invisible)["subject"]
        assert twin["id"] == first["subject"]["id"], ascii(invisible)
        assert enroll(client, png(BLUE), subject=invisible + "Jos\u00e9")["subject"]["id"] == twin["id"]
    # after a non-ASCII character a selector is part of it (an emoji's presentation, a kanji's variant): kept
    for name in ("I \u2764\ufe0f", "\u203c\ufe0f", "\u845b\U000e0100", "\u1820\u180b"):
        assert enroll(client, png(GREEN), subject=name)["subject"]["name"] == name, ascii(name)
    dollar = enroll(client, png(GREEN), subject="$")["subject"]["id"]
    assert enroll(client, png(GREEN), subject="$\ufe0f")["subject"]["id"] == dollar  # after ASCII: nothing drawn
    long_nfd = "e\u0301" * 150  # 300 code points as sent, 150 letters stored: the limit counts the stored form
    assert enroll(client, png(GREEN), subject=long_nfd)["subject"]["name"] == "\u00e9" * 150
    padded = client.post("/verify", files={"image": ("x.png", png(BLUE))}, data={"subject": " " * 5 + "Jos\u00e9"
                                                                                   + " " * 200})
    assert padded.status_code == 200 and padded.json()["subject"]["id"] == first["subject"]["id"], padded.text
    too_long = client.post("/enroll", files={"image": ("x.png", png(GREEN))}, data={"subject": "x" * 201})
    is_error(too_long, 422, "bad_parameter")
    for prefix in ["Jose\u0301", "Jos\u00e9\u200b", " \ufeffJo"]:  # a pasted prefix: NFD, zero-width, spaces
        listed = client.get("/subjects", params={"name": prefix}).json()
        assert [item["id"] for item in listed["items"]] == [first["subject"]["id"]], prefix
    assert client.get("/subjects", params={"name": "Jo "}).json()["total"] == 0  # a trailing space is meant
    renamed = client.patch(f"/subjects/{first['subject']['id']}", json={"name": "Zo\u0308e\u200b"})
    assert renamed.json()["name"] == "Z\u00f6e", renamed.text
    scotland = "Ewan \U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # ends in tags
    assert enroll(client, png(GREEN), subject=scotland)["subject"]["name"] == scotland
    r = client.post("/enroll", files={"image": ("x.png", png(GREEN))}, data={"subject": "\u202eab"})
    is_error(r, 422, "bad_parameter")  # a direction override is refused, not trimmed away


def test_enrolling_the_same_image_after_new_weights_brings_the_face_back(tmp_path):
    """Through the API (the model's step on the inference thread, the store's off it): 200, created false,
    the same face id, now of the loaded weights, and /verify finds it again."""
    with make_client(tmp_path, "fake-v1") as client:
        assert client.app.state.runtime.wait_ready(30)
        first = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"}).json()
    with make_client(tmp_path, "fake-v2") as client:
        assert client.app.state.runtime.wait_ready(30)
        probe = {"image": ("p.png", png(RED, width=200))}
        is_error(client.post("/verify", files=probe, data={"subject": "alice"}), 409, "no_current_faces")
        again = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
        assert again.status_code == 200, again.text
        body = again.json()
        assert body["created"] is False and body["face_id"] == first["face_id"] and body["model_version"] == "fake-v2"
        assert client.post("/verify", files=probe, data={"subject": "alice"}).json()["match"] is True


def test_a_face_under_the_enrollment_quality_is_refused_and_nothing_is_stored(tmp_path):
    """VISAGE_MIN_ENROLL_QUALITY: a 30 px face (quality 0.3746 = score x 30/80) is refused with a reason; a 100 px
    one is enrolled; a probe of the same small face is still answered (only enrollment is guarded)."""
    with make_client(tmp_path, min_enroll_quality=0.5) as client:
        assert client.app.state.runtime.wait_ready(30)
        small = {"image": ("s.png", png(RED, width=50))}  # the square cut to 30 px by the canvas
        r = client.post("/enroll", files=small, data={"subject": "alice"})
        is_error(r, 422, "low_quality_face")
        assert "quality is 0.3746 (30x100 px" in r.json()["detail"] and "VISAGE_MIN_ENROLL_QUALITY" in r.text
        assert client.get("/subjects").json()["total"] == 0
        big = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
        assert big.status_code == 201
        assert client.post("/verify", files=small, data={"subject": "alice"}).status_code == 200


def test_an_image_sent_as_text_says_to_send_a_file(client):
    """``-F image=photo.jpg`` (no @) sends the name as text: the detail said "Expected UploadFile, received:
    <class 'str'>", Python's words, not the client's."""
    r = client.post("/enroll", files={"subject": (None, "alice"), "image": (None, "photo.jpg")})
    is_error(r, 422, "bad_parameter")
    assert r.json()["detail"] == "image: send a file here, not text (multipart: curl -F image=@photo.jpg)"
    r = client.post("/compare", files={"image1": ("a.png", png(RED)), "image2": (None, "b.jpg")})
    assert r.json()["detail"].startswith("image2: send a file here") and "class" not in r.text


def test_a_blank_subject_name_is_named_as_the_problem(client):
    """``-F subject=" "`` was answered "give exactly one of subject (a name) or subject_id", though one was given."""
    for blank in (" ", "\u3000"):  # (an empty field is no field, to FastAPI)
        r = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": blank})
        is_error(r, 422, "bad_parameter")
        assert r.json()["detail"].startswith("subject is blank"), r.text
    r = client.post("/verify", files={"image": ("a.png", png(RED))})
    assert r.json()["detail"] == "give exactly one of subject (a name) or subject_id"


def test_a_form_field_given_twice_is_refused_not_overwritten(client):
    """FastAPI keeps the last of a repeated field: two images (or two names) in one /enroll would file the
    second face, or file it under the second name, with a 201. Nothing is stored."""
    two_images = [("image", ("a.png", png(RED))), ("image", ("b.png", png(BLUE)))]
    r = client.post("/enroll", files=two_images, data={"subject": "alice"})
    is_error(r, 422, "bad_parameter")
    assert "repeated: image" in r.json()["detail"]
    r = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": ["alice", "bob"]})
    is_error(r, 422, "bad_parameter")
    assert "repeated: subject" in r.json()["detail"]
    r = client.post("/verify", files={"image": ("a.png", png(RED))}, data={"subject": "alice", "far": ["1e-2", "1e-4"]})
    is_error(r, 422, "bad_parameter")
    assert client.get("/subjects").json()["total"] == 0


def test_ids_and_counts_are_digits_not_python_int_syntax(client):
    """Pydantic read "1_1" as Python's int() does: DELETE /subjects/1_1 deleted subject 11."""
    for i in range(11):
        enroll(client, png(RED if i % 2 else BLUE), subject=f"s{i}")
    ids = [s["id"] for s in client.get("/subjects", params={"limit": 50}).json()["items"]]
    assert 11 in ids
    image = {"image": ("a.png", png(RED))}
    for response in (client.delete("/subjects/1_1"), client.get("/subjects/1_0"),
                     client.delete("/subjects/1/faces/1_0"), client.get("/subjects", params={"limit": "1_0"}),
                     client.get("/subjects", params={"offset": "0x1"}),
                     client.post("/verify", files=image, data={"subject_id": "1_1"}),
                     client.post("/identify", files=image, data={"k": "1_0"}),
                     client.post("/identify", files=image, data={"k": "1.0"}),
                     # and a threshold: "0_1" was 1.0, "1_0" 10 (refused only as out of range)
                     client.post("/verify", files=image, data={"subject_id": "11", "threshold": "0_1"}),
                     client.post("/verify", files=image, data={"subject_id": "11", "threshold": "1_0"}),
                     client.post("/compare", files={"image1": ("a.png", png(RED)), "image2": ("b.png", png(RED))},
                                 data={"threshold": "0.0_5"})):
        is_error(response, 422, "bad_parameter")
        assert "digits" in response.json()["detail"], response.text
    assert client.get("/subjects/11").status_code == 200  # still there
    assert client.get("/subjects/011").json()["id"] == 11  # plain digits (a leading zero too) still read
    assert client.post("/identify", files=image, data={"k": "3"}).status_code == 200
    assert client.post("/verify", files=image, data={"subject_id": "11", "threshold": " 1E-1 "}).json()[
        "threshold"] == 0.1  # a plain decimal, any case, spaces around, still read


def test_a_trailing_slash_is_a_404_not_a_redirect_and_a_repeated_query_parameter_is_refused(client):
    """"/subjects/" answered an empty 307 to a URL made from the Host header, before the key was checked:
    clients that follow redirects sent their X-API-Key to that host. And ?limit=1&limit=2 kept the last."""
    for response in (client.get("/subjects/", headers={"Host": "evil.example:9999"}),
                     client.post("/enroll/", files={"image": ("a.png", png(RED))}, data={"subject": "a"})):
        is_error(response, 404, "not_found")
        assert "location" not in response.headers
    r = client.get("/subjects?limit=1&limit=2")
    is_error(r, 422, "bad_parameter")
    assert "repeated: limit" in r.json()["detail"]


def test_a_misspelt_or_misplaced_parameter_is_refused_not_ignored(client):
    """A misspelt ``treshold`` or ``fra``, or ``?threshold=`` in the URL, was ignored: /verify answered at the
    default FAR 1e-3 with a 200, where the client meant a stricter operating point."""
    enroll(client, png(RED), subject="alice")
    image = {"image": ("a.png", png(RED))}
    for data in ({"subject": "alice", "treshold": "0.9"}, {"subject": "alice", "fra": "1e-4"}):
        r = client.post("/verify", files=image, data=data)
        is_error(r, 422, "bad_parameter")
        assert f"unknown form field(s): {next(iter(set(data) - {'subject'}))}" in r.json()["detail"], r.text
        assert "threshold" in r.json()["detail"]  # and what it does take
    r = client.post("/verify?threshold=0.9&far=1e-4", files=image, data={"subject": "alice"})
    is_error(r, 422, "bad_parameter")
    assert "not in the URL: far, threshold" in r.json()["detail"]
    for path, files in [("/enroll", image), ("/identify", image), ("/embed", image),
                        ("/compare", {"image1": ("a.png", png(RED)), "image2": ("b.png", png(RED))})]:
        r = client.post(path, files=files, data={"subject": "alice", "extra": "1"} if path == "/enroll" else
                        {"extra": "1"})
        is_error(r, 422, "bad_parameter")
        assert "extra" in r.json()["detail"], path
    assert client.get("/subjects").json()["total"] == 1  # nothing more stored
    ok = client.post("/verify", files=image, data={"subject": "alice", "threshold": "0.9", "face": "largest"})
    assert ok.status_code == 200 and ok.json()["threshold"] == 0.9  # every real field still taken


def test_the_subject_routes_refuse_query_parameters_rather_than_act_on_them(client):
    """``DELETE /subjects/12?dry_run=true`` deleted the subject for real (and ``?confirm=no`` a face): a client
    that believes in a parameter the API does not have must hear so before anything irreversible happens."""
    face = enroll(client, png(RED), subject="alice")
    sid, fid = face["subject"]["id"], face["face_id"]
    json_type = {"Content-Type": "application/json"}
    for response in (client.delete(f"/subjects/{sid}?dry_run=true"),
                     client.delete(f"/subjects/{sid}/faces/{fid}?confirm=no"),
                     client.patch(f"/subjects/{sid}?dry_run=1", content=b'{"name": "bob"}', headers=json_type),
                     client.get(f"/subjects/{sid}?verbose=1")):
        is_error(response, 422, "bad_parameter")
        assert response.json()["detail"].startswith("this endpoint takes no query parameters: "), response.text
    assert client.head(f"/subjects/{sid}?verbose=1").status_code == 422
    kept = client.get(f"/subjects/{sid}").json()
    assert kept["name"] == "alice" and [f["id"] for f in kept["faces"]] == [fid]  # nothing was done


def test_a_queued_image_request_whose_client_hung_up_never_reaches_the_model(client, caplog):
    """The ASGI conversation of a client that sends its upload and hangs up while the one inference thread is
    busy: a 499, and the model never runs for it. (A real uvicorn and socket: test_app_e2e.py.)"""
    app = client.app
    embedder = app.state.runtime.service.pipeline.embedder
    calls = embedder.calls
    release = threading.Event()
    app.state.cpu_pool.submit(release.wait, 10)  # the inference thread is busy (for 10 s at most: where the
    # request is not dropped, it runs then, and the asserts say so)
    upload = httpx.Request("POST", "http://testserver/embed", files={"image": ("x.png", png(RED))})
    body = upload.read()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/embed", "raw_path": b"/embed", "root_path": "", "query_string": b"", "client": ("127.0.0.1", 9),
        "server": ("testserver", 80),
        "headers": [(b"x-api-key", KEY.encode()), (b"content-length", str(len(body)).encode()),
                    (b"content-type", upload.headers["content-type"].encode())],
    }

    async def hang_up_after_sending() -> list[dict]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
        sent: list[dict] = []

        async def receive() -> dict:
            return incoming.pop(0) if incoming else await asyncio.Event().wait()

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    try:
        with caplog.at_level(logging.INFO, logger="visage.api"):
            sent = client.portal.call(hang_up_after_sending)
    finally:
        release.set()
    assert sent[0]["status"] == 499 and json.loads(sent[1]["body"])["error"] == "client_closed_request"
    assert embedder.calls == calls  # the model never ran for it
    assert "hung up" in caplog.text
    assert client.post("/embed", files={"image": png(RED)}).status_code == 200 and embedder.calls == calls + 1


def test_image_requests_past_the_pending_limit_are_a_503_to_retry_not_a_queue(tmp_path, caplog):
    """Each waiting image request holds its upload in memory: past VISAGE_MAX_PENDING_IMAGES the service says
    "overloaded, retry in a second" instead of queueing without bound; the requests it admitted all finish."""
    with make_client(tmp_path, max_pending_images=2) as client:
        assert client.app.state.runtime.wait_ready(30)
        service, gate, started = client.app.state.runtime.service, threading.Event(), threading.Semaphore(0)
        embed = service.embed

        def slow_embed(data):
            started.release()
            gate.wait(30)
            return embed(data)

        service.embed = slow_embed
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(client.post("/embed", files={"image": png(RED)})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        assert started.acquire(timeout=30)  # one runs on the inference thread, the other waits for it
        deadline = time.monotonic() + 30
        while client.app.state.admission.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with caplog.at_level("WARNING"):
            refused = client.post("/embed", files={"image": png(RED)})
        is_error(refused, 503, "overloaded")
        assert "already running" not in caplog.text  # a load shed is counted, not logged as an error
        assert refused.headers["retry-after"] == "1" and "VISAGE_MAX_PENDING_IMAGES=2" in refused.json()["detail"]
        assert client.get("/subjects").status_code == 200  # only image requests count
        gate.set()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in answers] == [200, 200]
        assert client.app.state.admission.pending == 0
        assert client.post("/embed", files={"image": png(RED)}).status_code == 200


def test_api_key_is_required_except_on_health(tmp_path):
    with make_client(tmp_path) as client:
        client.app.state.runtime.wait_ready(30)
        for method, path in PROTECTED:
            is_error(client.request(method, path, headers={"X-API-Key": ""}), 401, "unauthorized")
            is_error(client.request(method, path, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert client.get(path, headers={"X-API-Key": ""}).status_code == 200
    with make_client(tmp_path, metrics_require_key=True) as client:
        is_error(client.get("/metrics", headers={"X-API-Key": ""}), 401, "unauthorized")
        assert client.get("/metrics").status_code == 200


def test_a_generated_key_is_stored_in_the_data_dir_and_stable(tmp_path):
    with make_client(tmp_path, api_keys="") as client:
        key = (tmp_path / "api_key").read_text().strip()
        assert len(key) >= 32 and (tmp_path / "api_key").stat().st_mode & 0o777 == 0o600
        client.app.state.runtime.wait_ready(30)
        assert client.get("/subjects", headers={"X-API-Key": key}).status_code == 200
    with make_client(tmp_path, api_keys="") as client:
        assert client.app.state.runtime.api_keys == [key]


def test_subjects_list_get_rename_delete(client):
    for i, color in enumerate([RED, BLUE, GREEN]):
        enroll(client, png(color), subject=f"person {i}")
    second = enroll(client, png(RED, width=400), subject="person 0")
    page = client.get("/subjects", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [s["name"] for s in page["items"]] == ["person 1"]
    detail = client.get("/subjects/1").json()
    assert detail["face_count"] == 2 and all(f["current"] and f["image_stored"] for f in detail["faces"])
    renamed = client.patch("/subjects/1", json={"name": "  Alice  ", "metadata": {"k": 1}}).json()
    assert renamed["name"] == "Alice" and renamed["metadata"] == {"k": 1}
    is_error(client.patch("/subjects/2", json={"name": "Alice"}), 409, "name_taken")
    # metadata that could be stored but never answered again: refused, and nothing is stored
    deep: dict = {"k": 1}
    for _ in range(40):
        deep = {"d": deep}
    for bad in ('{"metadata": {"note": "\\ud800"}}', json.dumps({"metadata": deep})):
        is_error(client.patch("/subjects/1", content=bad.encode(), headers={"content-type": "application/json"}),
                 422, "bad_parameter")
    assert client.get("/subjects/1").json()["metadata"] == {"k": 1} and client.get("/subjects").status_code == 200
    assert client.delete(f"/subjects/1/faces/{second['face_id']}").json() == {
        "face_id": second["face_id"], "subject_id": 1}
    assert client.delete("/subjects/2").json() == {"subject_id": 2, "deleted_faces": 1}
    is_error(client.get("/subjects/2"), 404, "subject_not_found")
    hits = client.post("/identify", files={"image": png(BLUE)}, data={"k": "5"}).json()["faces"][0]["candidates"]
    assert "person 1" not in [h["name"] for h in hits]
    ready = client.get("/readyz").json()
    assert ready["subjects"] == 2 and ready["current_faces"] == ready["indexed_faces"] == 2


def test_enroll_and_delete_racing_never_500(client):
    statuses: list[int] = []

    def enroller(worker: int) -> None:
        for i in range(8):
            r = client.post("/enroll", files={"image": png(RED, width=200 + 10 * i + worker)},
                            data={"subject": "race"})
            statuses.append(r.status_code)

    def deleter() -> None:
        for _ in range(8):
            page = client.get("/subjects", params={"name": "race"}).json()
            for s in page["items"]:
                statuses.append(client.delete(f"/subjects/{s['id']}").status_code)

    threads = [threading.Thread(target=enroller, args=(w,)) for w in range(3)] + [threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses and set(statuses) <= {200, 201, 404}, statuses
    assert client.app.state.runtime.service.gallery.agreement()["agree"]


def test_the_default_far_is_matched_by_value_too(tmp_path):
    with make_client(tmp_path, default_far="0.001") as client:
        assert client.app.state.runtime.wait_ready(30) and client.get("/readyz").status_code == 200
        enroll(client, png(RED), subject="alice")
        answer = client.post("/verify", files={"image": png(RED)}, data={"subject": "alice"}).json()
        assert answer["far"] == "1e-3" and answer["threshold"] == 0.9


def test_health_probes_answer_head_as_well_as_get(client):
    for path in ("/healthz", "/readyz", "/metrics"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""


def test_every_get_answers_head_with_its_status_and_headers_and_no_body(client):
    """HEAD /subjects was a 405 (RFC 9110 9.3.2: a server answers HEAD wherever it answers GET)."""
    subject = enroll(client, png(RED), subject="alice")["subject"]["id"]
    for path in ("/subjects", f"/subjects/{subject}", "/subjects?name=al"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"] and head.headers["x-request-id"]
    assert client.head("/subjects/999").status_code == 404
    assert client.head("/subjects", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.head("/subjects?limit=1&limit=2").status_code == 422


def test_readyz_reports_loading_failure_and_endpoints_answer_503(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, api_keys=KEY, weights=tmp_path / "missing.pt"))
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        app.state.runtime.wait_ready(30)
        assert client.get("/healthz").json() == {"status": "ok"}
        is_error(client.get("/readyz"), 503, "not_ready")
        assert "weights file not found" in client.get("/readyz").json()["detail"]
        failed = client.post("/embed", files={"image": png(RED)})
        is_error(failed, 503, "not_ready")
        assert "retry-after" not in failed.headers  # a failed load does not pass by itself
    with make_client(tmp_path, default_far="1e-9") as client:  # an operating point the weights lack
        client.app.state.runtime.wait_ready(30)
        is_error(client.get("/readyz"), 503, "not_ready")
        assert "VISAGE_DEFAULT_FAR=1e-9 is not calibrated" in client.get("/readyz").json()["detail"]


def test_metrics_count_requests_by_route_and_gallery_size(client):
    enroll(client, png(RED), subject="alice")
    client.get("/subjects/1")
    client.get("/subjects/99")
    client.get("/nowhere/1")
    for made_up in ("FOOA", "FOOB"):
        client.request(made_up, "/healthz")
    text = client.get("/metrics").text
    assert 'method="other"' in text and "FOO" not in text  # invented methods cannot grow the label set
    assert 'visage_http_requests_total{method="POST",route="/enroll",status="201"} 1.0' in text
    assert 'visage_http_requests_total{method="GET",route="/subjects/{subject_id}",status="404"} 1.0' in text
    assert 'route="unmatched"' in text and "/nowhere" not in text
    assert 'visage_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/enroll"}' in text
    assert 'visage_gallery{kind="current_faces"} 1.0' in text and "visage_ready 1.0" in text


def test_metrics_name_the_route_of_docs_and_of_requests_refused_before_routing(client):
    """/openapi.json and /docs are routes (Starlette's, which set no route in the scope), and an upload refused
    by the body limit was sent to /enroll: neither is a scanner's "unmatched" path."""
    client.get("/openapi.json")
    client.get("/docs")
    huge = client.post("/enroll", content=b"x" * 10, headers={"content-length": str(10**9)})
    is_error(huge, 413, "request_too_large")
    client.get("/nowhere")
    text = client.get("/metrics").text
    assert 'visage_http_requests_total{method="GET",route="/openapi.json",status="200"} 1.0' in text
    assert 'visage_http_requests_total{method="GET",route="/docs",status="200"} 1.0' in text
    assert 'visage_http_requests_total{method="POST",route="/enroll",status="413"} 1.0' in text
    assert 'visage_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'route="unmatched",status="200"' not in text
    assert "_created" not in text  # no creation-time series beside each counter and histogram


def test_an_unexpected_error_is_a_json_500_logged_once_and_counted(client, caplog):
    """No traceback in the body, one in the log (not re-raised for the server to log again), and the metrics see
    the 500 like any other answer."""

    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/boom", boom)
    with caplog.at_level(logging.ERROR):
        r = client.get("/boom")  # (TestClient re-raises what reaches the server: nothing must)
    assert r.status_code == 500 and r.json()["error"] == "internal_error" and "secret" not in r.text
    assert r.headers["x-request-id"] in r.json()["detail"]  # what the user quotes is what the log is keyed by
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and "GET /boom" in logged[0].getMessage()
    assert 'visage_http_requests_total{method="GET",route="/boom",status="500"} 1.0' in client.get("/metrics").text


def test_while_loading_every_endpoint_but_healthz_is_a_503_that_says_when_to_ask_again(tmp_path, monkeypatch):
    release = threading.Event()
    real_open = runtime_module.open_service
    monkeypatch.setattr(runtime_module, "open_service", lambda *a, **k: release.wait(30) and real_open(*a, **k))
    with make_client(tmp_path) as client:
        try:
            assert client.get("/healthz").status_code == 200
            for r in (client.get("/readyz"), client.post("/embed", files={"image": png(RED)})):
                is_error(r, 503, "not_ready")
                assert r.headers["retry-after"] == "5"
        finally:
            release.set()
        assert client.app.state.runtime.wait_ready(30) and client.get("/readyz").status_code == 200


def test_a_gallery_locked_at_start_up_is_opened_once_the_lock_is_gone(tmp_path, monkeypatch):
    """Another process holding the write lock past the busy timeout while a worker started made the load fail for
    good: /readyz 503 "failed to load" until someone restarted it, while /healthz said it was alive."""
    from app.store import Store

    Store(tmp_path / "visage.db").close()
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 0.3)
    with ExitStack() as other_process:
        other_process.enter_context(write_locked(tmp_path / "visage.db"))
        with make_client(tmp_path) as client:
            runtime = client.app.state.runtime
            deadline = time.monotonic() + 20
            while runtime.retrying is None and time.monotonic() < deadline:
                time.sleep(0.05)
            r = client.get("/readyz")
            is_error(r, 503, "not_ready")
            assert r.headers["retry-after"] == "5" and "retrying" in r.json()["detail"]
            assert "database is locked" in r.json()["detail"]
            assert client.get("/healthz").status_code == 200
            other_process.close()  # it lets go
            assert runtime.wait_ready(30) and runtime.error is None and runtime.retrying is None
            assert client.get("/readyz").status_code == 200


def test_a_gallery_that_cannot_be_opened_until_someone_acts_fails_the_load_at_once(tmp_path):
    """Only what may pass (a lock, a full disk) is tried again: a folder where the database should be is not
    "still loading" for ever."""
    (tmp_path / "visage.db").mkdir()
    with make_client(tmp_path) as client:
        runtime = client.app.state.runtime
        assert not runtime.wait_ready(30) and runtime.retrying is None
        r = client.get("/readyz")
        is_error(r, 503, "not_ready")
        assert r.json()["detail"].startswith("failed to load: ") and "retry-after" not in r.headers


def test_a_gallery_that_cannot_be_written_is_a_503_and_the_same_request_succeeds_later(tmp_path, monkeypatch):
    """Another process holding SQLite's write lock past the busy timeout (a batch enrollment stuck, a backup tool
    that writes): a retryable 503 naming the cause, nothing stored, and the same request works once it lets go."""
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 0.3)
    with make_client(tmp_path) as client:
        assert client.app.state.runtime.wait_ready(30)
        with write_locked(tmp_path / "visage.db"):
            busy = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
        is_error(busy, 503, "storage_unavailable")
        assert busy.headers["retry-after"] == "5"
        assert "database is locked" in busy.json()["detail"] and "nothing was stored" in busy.json()["detail"]
        assert client.get("/subjects").json()["total"] == 0
        again = client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})
        assert again.status_code == 201 and client.get("/subjects").json()["total"] == 1


def test_enrolls_queued_behind_another_process_lock_are_each_answered_within_one_busy_timeout(tmp_path, monkeypatch):
    """Each enroll's busy timeout began only once it had a turn to write (4 at a time per worker, then one at a
    time on the store's lock): behind another process's lock the last of 12 got its 503 after 3 timeouts (12
    before the store's own fix). The timeout now counts from the request's write."""
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 3.0)  # (long enough that a loaded machine's overhead is small)
    with make_client(tmp_path) as client:
        assert client.app.state.runtime.wait_ready(30)
        answers: list[tuple[int, float]] = []

        def enroll(i: int) -> None:
            start = time.monotonic()
            r = client.post("/enroll", files={"image": (f"{i}.png", png((i, 0, 0)))}, data={"subject": f"p{i}"})
            answers.append((r.status_code, time.monotonic() - start))

        with write_locked(tmp_path / "visage.db"):
            concurrently(enroll, 12)
        assert [code for code, _ in answers] == [503] * 12
        assert max(took for _, took in answers) < 6.0, sorted(round(took, 2) for _, took in answers)  # was 9.0


def test_an_enroll_waiting_for_the_write_lock_does_not_hold_the_inference_thread(tmp_path, monkeypatch):
    """Another process holding SQLite's write lock (a stuck batch) makes an enroll wait up to the busy timeout;
    meanwhile the worker's one inference thread must go on serving /embed, /verify and /identify (the store's
    steps of an enroll run on the store's threads, docs/SERVICE.md "Concurrency")."""
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 6.0)
    with make_client(tmp_path) as client:
        assert client.app.state.runtime.wait_ready(30)
        answers: list = []
        with write_locked(tmp_path / "visage.db"):
            waiting = threading.Thread(target=lambda: answers.append(
                client.post("/enroll", files={"image": ("a.png", png(RED))}, data={"subject": "alice"})))
            waiting.start()
            deadline = time.monotonic() + 10
            while client.app.state.admission.pending < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # the fake model is instant: the enroll now waits for the lock
            start = time.perf_counter()
            embedded = client.post("/embed", files={"image": png(BLUE)})
            took = time.perf_counter() - start
            assert embedded.status_code == 200 and took < 3.0, took
            assert waiting.is_alive()  # still waiting for the lock, off the inference thread
        waiting.join(30)
        assert [r.status_code for r in answers] == [201]
        assert client.get("/subjects").json()["total"] == 1


def test_enrolls_queued_on_the_write_lock_leave_threads_for_everything_else(tmp_path, monkeypatch):
    """45 enrolls waiting for SQLite's write lock (another process holds it) took all 40 threads of anyio's
    shared pool: /readyz, /subjects and /metrics waited behind them (17 s), and a health check gave up. Writes
    now wait for at most STORE_WRITERS threads; every enroll still succeeds once the lock is free."""
    monkeypatch.setattr("app.store.BUSY_TIMEOUT_S", 20.0)
    n = 45
    with make_client(tmp_path, max_pending_images=200) as client:
        assert client.app.state.runtime.wait_ready(30)
        answers: list = []
        with write_locked(tmp_path / "visage.db"):
            threads = [threading.Thread(target=lambda i=i: answers.append(client.post(
                "/enroll", files={"image": ("a.png", png(RED, width=130 + i))}, data={"subject": "alice"})))
                for i in range(n)]
            for t in threads:
                t.start()
            time.sleep(2)  # (the fake model is instant: every enroll is now at its store step)
            start = time.perf_counter()
            assert client.get("/readyz").status_code == 200 and client.get("/subjects").status_code == 200
            assert time.perf_counter() - start < 3.0
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in answers) == [201] * n
        assert client.get("/subjects/1").json()["face_count"] == n


def test_every_answer_carries_a_request_id_that_the_model_work_sees(client):
    """Generated (32 hex digits) unless the client or a proxy sent one that looks like an id; the CPU worker
    threads see the same id, so what the model work logs is keyed like the request."""

    async def whose(request: Request) -> dict:
        return {"id": await run_cpu(request, current_request_id)}

    client.app.add_api_route("/whose", whose)
    first, second = client.get("/healthz").headers["x-request-id"], client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", first) and first != second
    assert client.get("/subjects/999", headers={"X-Request-ID": "lb-7f3a:1"}).headers["x-request-id"] == "lb-7f3a:1"
    forged = client.get("/healthz", headers={"X-Request-ID": 'x" status=200'}).headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", forged)  # nothing that could forge a log line
    r = client.get("/whose", headers={"X-Request-ID": "trace-42"})
    assert r.json() == {"id": "trace-42"} and r.headers["x-request-id"] == "trace-42"


def test_openapi_documents_a_model_for_every_response(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) == 13
    for path, method, op in operations:
        for status, response in op["responses"].items():
            content = response.get("content", {})
            if path == "/metrics" and status == "200":
                assert "text/plain" in content
                continue
            schema = content["application/json"]["schema"]
            assert "$ref" in schema, (path, method, status, schema)
            if status.startswith(("4", "5")):
                assert schema["$ref"].endswith("/ErrorResponse"), (path, method, status)
        if (method, path) in PROTECTED or path.startswith("/subjects"):
            assert op.get("security") == [{"APIKeyHeader": []}], (path, method)


def test_form_text_that_is_not_utf8_is_read_as_latin1(client):
    """docs/SERVICE.md: a client that encodes its form fields in Latin-1 still gets the name it meant."""
    boundary = "visage-boundary"
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"subject\"\r\n\r\n".encode(), b"Jos\xe9\r\n",
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
        "Content-Type: image/png\r\n\r\n".encode(), png(RED), f"\r\n--{boundary}--\r\n".encode(),
    ])
    r = client.post("/enroll", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 201, r.text
    assert r.json()["subject"]["name"] == "José"
    assert enroll(client, png(RED), subject="José")["created"] is False  # the same subject, sent as UTF-8


def test_a_cut_off_multipart_upload_is_a_400_not_a_missing_field(client):
    """A body that ends inside its last part (a dropped connection, a proxy's cut) was a 422 "image: Field
    required": Starlette drops the unfinished part, and the client was told it forgot a field it sent."""
    boundary = "visage-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"subject\"\r\n\r\nt\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n").encode()
    whole = head + png(RED) + f"\r\n--{boundary}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary=\"{boundary}\""}

    for cut in (whole[: len(head) + 40], whole[:-4], head[:30]):
        r = client.post("/enroll", content=cut, headers=headers)
        is_error(r, 400, "bad_request")
        assert "cut off" in r.json()["detail"]
    assert client.get("/subjects").json()["total"] == 0
    assert client.post("/enroll", content=whole, headers=headers).status_code == 201
    epilogue = whole + b"an epilogue, which RFC 2046 allows\r\n"
    assert client.post("/enroll", content=epilogue, headers=headers).status_code == 200  # the same image again


def test_a_json_body_without_its_content_type_says_so(client):
    """PATCH with a valid JSON object but no (or a text/plain) Content-Type: "request: Input should be a valid
    dictionary or object to extract fields from" did not say what was wrong."""
    sid = enroll(client, png(RED), subject="alice")["subject"]["id"]
    for headers in ({}, {"Content-Type": "text/plain"}):
        r = client.patch(f"/subjects/{sid}", content=b'{"name": "bob"}', headers=headers)
        is_error(r, 422, "bad_parameter")
        assert "Content-Type: application/json" in r.json()["detail"], r.text


@pytest.mark.parametrize("size", [1, 7, 64])
def test_the_closing_boundary_is_found_across_the_messages_of_a_streamed_body(size):
    """The body reaches the app in messages of any size (a test client sends one): a closing delimiter split
    across two of them is still the end of a whole upload, and one missing is still a cut."""
    import asyncio

    from app.limits import BodyLimitMiddleware

    boundary = "b0undary"
    whole = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"subject\"\r\n\r\nt\r\n"
             f"--{boundary}--\r\n").encode()
    scope = {"type": "http", "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}

    def run(body: bytes) -> str:
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        async def app(scope, receive, send):
            while (await receive()).get("more_body"):
                pass

        try:
            asyncio.run(BodyLimitMiddleware(app, max_bytes=10_000)(scope, receive, None))
        except Exception as exc:  # noqa: BLE001 - the middleware's refusal, an HTTPException
            return str(getattr(exc, "detail", exc))
        return "ok"

    assert run(whole) == "ok"
    assert "cut off" in run(whole[:-5])


def test_every_field_the_openapi_document_lists_is_taken(client):
    """form_fields' allow-lists repeat each endpoint's parameters: one left behind by a rename or a new field
    would refuse a field the endpoint documents. Every documented field is accepted (whatever else its value
    earns), so the lists and the schema agree."""
    doc = client.get("/openapi.json").json()
    for path in ("/enroll", "/verify", "/identify", "/compare", "/embed"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
        fields = schema["properties"]
        files = {n: ("a.png", png(RED)) for n, f in fields.items() if f.get("format") == "binary"
                 or f.get("contentMediaType") == "application/octet-stream"}
        data = {n: "1" for n in fields if n not in files}
        assert files, path
        r = client.post(path, files=files, data=data)
        assert "unknown form field" not in r.text, (path, r.text)
