"""model.decode: real-world files -> upright 8-bit RGB, or a typed error (see photos/edge/MANIFEST.md)."""

from __future__ import annotations

import io
import resource
import time

import numpy as np
import pytest
from conftest import photo
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.decode import (
    BACKGROUND,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodeLimits,
    decode_image,
    read_image_file,
    read_limited,
    to_rgb8,
)
from model.errors import EmptyImage, ImageTooLarge, UnreadableImage, UnsupportedImageType, VisageError


@pytest.fixture(scope="module")
def upright() -> np.ndarray:
    """obama.jpg at the 455x568 size every derived edge file was made at."""
    img = Image.open(photo("obama.jpg")).convert("RGB").resize((455, 568), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float64)


def mean_abs_diff(img: Image.Image, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(img, dtype=np.float64) - ref).mean())


@pytest.mark.parametrize(
    ("rel", "size"),
    [
        ("obama.jpg", (910, 1137)),
        ("edge/obama.webp", (455, 568)),
        ("edge/obama_16bit_grey.png", (364, 455)),
        ("edge/obama_16bit_rgb.png", (364, 455)),
        ("edge/obama_4000px.jpg", (4000, 2249)),
        ("edge/obama_cmyk.jpg", (455, 568)),
        ("edge/obama_exif_orientation6.jpg", (455, 568)),
        ("edge/obama_grey.jpg", (455, 568)),
        ("edge/obama_palette.png", (455, 568)),
        ("edge/obama_rgba.png", (455, 568)),
        ("edge/obama_tiny_face.jpg", (91, 114)),
    ],
)
def test_every_good_file_decodes_to_8bit_rgb(rel, size):
    img = read_image_file(str(photo(rel)))
    assert img.mode == "RGB" and img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    assert 40 < arr.mean() < 200  # neither black nor blown out


@pytest.mark.parametrize("rel", ["edge/obama.webp", "edge/obama_palette.png", "edge/obama_cmyk.jpg"])
def test_colour_conversions_keep_the_picture(rel, upright):
    """Same pixels as the RGB original up to compression (inverted CMYK or a wrong palette: ~100 off)."""
    assert mean_abs_diff(read_image_file(str(photo(rel))), upright) < 4.0


def test_cmyk_comes_out_in_normal_colours(upright):
    img = np.asarray(read_image_file(str(photo("edge/obama_cmyk.jpg"))), dtype=np.float64)
    for c in range(3):  # channel by channel, so swapped or inverted channels cannot hide in the average
        assert abs(img[..., c].mean() - upright[..., c].mean()) < 3.0


def test_exif_orientation_is_applied(upright):
    path = photo("edge/obama_exif_orientation6.jpg")
    assert Image.open(path).size == (568, 455)  # stored on its side
    img = read_image_file(str(path))
    assert img.size == (455, 568)  # portrait, as displayed
    assert mean_abs_diff(img, upright) < 4.0  # and the right way up, not merely rotated


def test_16bit_grey_is_rescaled_not_clipped_to_white():
    path = photo("edge/obama_16bit_grey.png")
    raw = np.asarray(Image.open(path))
    assert raw.dtype == np.uint16 and raw.max() > 255  # really 16-bit data
    arr = np.asarray(read_image_file(str(path)))
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    # the file holds 8-bit grey x 257, so 16 -> 8 bits gives the 8-bit values back exactly
    assert np.array_equal(arr[..., 0], (raw // 257).astype(np.uint8))
    assert (arr == 255).mean() < 0.01
    grey8 = np.asarray(Image.open(photo("edge/obama_grey.jpg")), dtype=np.float64)
    assert abs(arr.mean() - grey8.mean()) < 3.0  # same brightness as the 8-bit grey version


def test_16bit_values_map_to_their_top_byte():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    arr = np.asarray(decode_image(buf.getvalue()))
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_images_are_stretched_to_the_full_range():
    img = to_rgb8(Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 127, 255]


def test_grey_jpeg_becomes_three_equal_channels():
    path = photo("edge/obama_grey.jpg")
    arr = np.asarray(read_image_file(str(path)))
    assert np.array_equal(arr[..., 0], np.asarray(Image.open(path)))
    assert (arr[..., 0] == arr[..., 2]).all()


def test_transparency_is_composited_on_grey():
    path = photo("edge/obama_rgba.png")
    rgba = np.asarray(Image.open(path))
    arr = np.asarray(read_image_file(str(path)))
    assert rgba[0, 0, 3] == 0 and tuple(arr[0, 0]) == BACKGROUND  # fully transparent corner -> background
    cy, cx = rgba.shape[0] // 2, rgba.shape[1] // 2
    assert rgba[cy, cx, 3] == 255 and np.array_equal(arr[cy, cx], rgba[cy, cx, :3])  # opaque centre unchanged


def _associated_alpha_tiff(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """A grey + alpha TIFF whose ExtraSamples tag says "associated" (premultiplied: Pillow's mode La), as
    Photoshop, libtiff tools and scanners write it; Pillow itself writes "unassociated" (2)."""
    buf = io.BytesIO()
    premultiplied = (grey.astype(np.uint16) * alpha // 255).astype(np.uint8)
    Image.merge("LA", (Image.fromarray(premultiplied), Image.fromarray(alpha))).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = int.from_bytes(data[4:8], "little")
    for i in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        if int.from_bytes(data[entry:entry + 2], "little") == 338:  # ExtraSamples
            data[entry + 8:entry + 10] = (1).to_bytes(2, "little")
    return bytes(data)


def test_premultiplied_alpha_tiff_is_composited_on_grey():
    """Mode La (grey with associated alpha) raised "conversion from La to L not supported" outside decode's
    error handling: a 500 from every image endpoint, and `visage enroll` stopped its whole batch."""
    face = np.asarray(Image.open(photo("obama.jpg")).convert("L").resize((120, 150)))
    alpha = np.full(face.shape, 255, np.uint8)
    alpha[:, :10] = 0  # a transparent strip
    alpha[:, 10:20] = 64  # and a quarter-opaque one: grey * 3/4 + the face / 4 (premultiplied: stored as face / 4)
    data = _associated_alpha_tiff(face, alpha)
    assert Image.open(io.BytesIO(data)).mode == "La"
    arr = np.asarray(decode_image(data)).astype(int)
    assert arr.shape == (150, 120, 3) and (arr[..., 0] == arr[..., 2]).all()
    assert np.array_equal(arr[:, 20:, 0], face[:, 20:])  # opaque pixels unchanged
    assert (arr[:, :10] == BACKGROUND[0]).all()  # transparent ones on the grey background
    blend = BACKGROUND[0] * (1 - 64 / 255) + face[:, 10:20].astype(float) * 64 / 255
    assert np.abs(arr[:, 10:20, 0] - blend).max() <= 1.5  # (the file stores face * 64 // 255: rounding)


def test_premultiplied_rgba_is_composited_on_grey_too():
    colour = np.zeros((4, 4, 4), np.uint8)
    colour[..., 0], colour[..., 3] = 100, 128  # half-opaque, premultiplied red 200
    arr = np.asarray(to_rgb8(Image.fromarray(colour, "RGBa"))).astype(int)
    expected = [100 + BACKGROUND[0] * 127 / 255, BACKGROUND[1] * 127 / 255, BACKGROUND[2] * 127 / 255]
    assert np.abs(arr[0, 0] - np.array(expected)).max() <= 1


def test_a_pixel_mode_that_cannot_be_converted_is_unreadable_not_a_crash(monkeypatch):
    def unconvertible(img):
        raise ValueError(f"conversion from {img.mode} to RGB not supported")

    monkeypatch.setattr("model.decode.to_rgb8", unconvertible)
    with pytest.raises(UnreadableImage, match="pixel format"):
        decode_image(photo("obama.jpg").read_bytes())


def test_a_float_image_with_a_nan_or_inf_pixel_keeps_its_picture():
    """The stretch used min and max, so one NaN (or inf) pixel turned every other pixel into one value."""
    for bad in (np.nan, np.inf, -np.inf):
        values = np.array([[-1.0, 0.0, 1.0, bad]], dtype=np.float32)
        assert np.asarray(to_rgb8(Image.fromarray(values)))[0, :3, 0].tolist() == [0, 127, 255]


def _modes_of(face: np.ndarray) -> dict[str, Image.Image]:
    """One picture in every mode whose conversion runs in bands, with values that differ from band to band."""
    grey = face[..., 0]
    alpha = np.tile(np.arange(face.shape[1], dtype=np.uint8) * 7, (face.shape[0], 1))
    floats = grey.astype(np.float32) * 3.0 - 100.0
    floats[0, 0], floats[-1, -1] = np.nan, np.inf  # the finite range spans the first and last bands
    palette = Image.fromarray(face).quantize(16)
    palette.info["transparency"] = 3
    premultiplied = (face.astype(np.uint16) * alpha[..., None] // 255).astype(np.uint8)
    return {
        "F": Image.fromarray(floats, "F"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "I": Image.fromarray(grey.astype(np.int32) * 40),
        "RGBA": Image.fromarray(np.dstack([face, alpha]), "RGBA"),
        "LA": Image.fromarray(np.dstack([grey, alpha]), "LA"),
        "P": palette,
        "RGBa": Image.fromarray(np.dstack([premultiplied, alpha]), "RGBa"),
    }


def test_band_by_band_conversion_matches_the_whole_image_at_once(monkeypatch):
    """Rescaling and compositing run on bands of rows (peak memory); a scale found per band, a band pasted at the
    wrong row or a palette's transparency lost in the crop would each change pixels here."""
    face = np.asarray(Image.open(photo("obama.jpg")).convert("RGB").resize((120, 150)))
    whole = {mode: np.asarray(to_rgb8(img)) for mode, img in _modes_of(face).items()}
    monkeypatch.setattr("model.decode.BAND_PIXELS", 120 * 7)  # 7 rows a band: 22 bands, the last one short
    for mode, img in _modes_of(face).items():
        banded = np.asarray(to_rgb8(img))
        assert banded.shape == (150, 120, 3), mode
        assert np.array_equal(banded, whole[mode]), mode
    assert whole["F"][..., 0].min() == 0 and whole["F"][..., 0].max() == 255  # the one scale spans the image


def test_float_conversion_holds_no_full_size_temporaries():
    """Peak memory of a large upload (docs/SERVICE.md): stretching a 12-Mpx float image allocated six full-size
    arrays in numpy (isfinite, the finite values, nan_to_num, the arithmetic, clip, uint8: +812 MiB at 40 Mpx).
    Band by band they are a few MiB; numpy's allocations are what tracemalloc sees."""
    import tracemalloc

    values = np.tile(np.linspace(-5.0, 5.0, 4000, dtype=np.float32), (3000, 1))  # 48 MB
    img = Image.fromarray(values, "F")
    del values
    tracemalloc.start()
    try:
        out = to_rgb8(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.asarray(out)[0, [0, -1], 0].tolist() == [0, 255]
    assert peak < 24e6, f"{peak / 1e6:.0f} MB of numpy temporaries for a 48 MB image"


def test_truncated_jpeg_is_unreadable():
    with pytest.raises(UnreadableImage, match="truncated"):
        read_image_file(str(photo("edge/bad/truncated.jpg")))


def test_text_file_named_jpg_is_unreadable():
    with pytest.raises(UnreadableImage, match="not an image"):
        read_image_file(str(photo("edge/bad/not_an_image.jpg")))


def test_empty_file_is_empty_image():
    with pytest.raises(EmptyImage, match="empty"):
        read_image_file(str(photo("edge/bad/empty.jpg")))


def test_decompression_bomb_is_refused_before_any_pixel_is_allocated():
    data = photo("edge/bad/bomb_20000x20000.png").read_bytes()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert info.value.status == 413
    # the file's size (20000 x 20000), not Pillow's limit (178956970), and our limit, not Pillow's
    assert info.value.detail == f"the image declares 400000000 pixels; the limit is {DEFAULT_MAX_PIXELS} pixels"
    assert elapsed < 1.0  # decoding 400 Mpx would take many seconds
    assert grown_mib < 100  # as 1-bit it would be 400 MB, as RGB 1.2 GB


def test_a_huge_file_is_refused_after_reading_one_byte_past_the_limit(tmp_path):
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as fh:  # sparse: 8 GiB on paper, nothing on disk
        fh.truncate(8 * 1024**3)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLarge, match=f"limit of {DEFAULT_MAX_BYTES} bytes"):
        read_image_file(huge)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 100  # MiB
    assert read_limited(photo("obama.jpg")) == photo("obama.jpg").read_bytes()


def test_pixel_and_byte_limits():
    data = photo("edge/obama_4000px.jpg").read_bytes()
    with pytest.raises(ImageTooLarge, match="4000x2249"):
        decode_image(data, DecodeLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    assert decode_image(data, DecodeLimits(max_bytes=len(data), max_pixels=4000 * 2249)).size == (4000, 2249)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # what the service ignores too
def test_our_pixel_limit_counts_above_pillows_warning_threshold(monkeypatch):
    """Pillow warns over MAX_IMAGE_PIXELS (89 Mpx) and refuses over twice that; a limit the operator raised
    between the two used to be cut to Pillow's warning threshold."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)  # the 9 Mpx photo is now past Pillow's warning
    data = photo("edge/obama_4000px.jpg").read_bytes()
    assert decode_image(data, DecodeLimits(max_bytes=len(data), max_pixels=10_000_000)).size == (4000, 2249)
    with pytest.raises(ImageTooLarge, match="4000x2249 pixels; the limit is 8000000"):
        decode_image(data, DecodeLimits(max_bytes=len(data), max_pixels=8_000_000))


def test_unsupported_formats_are_415():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "TGA")
    with pytest.raises(UnsupportedImageType) as info:
        decode_image(buf.getvalue())
    assert info.value.status == 415


def test_non_bytes_input_is_unreadable():
    with pytest.raises(UnreadableImage):
        decode_image("obama.jpg")  # a path is not image data


def test_every_decode_error_is_a_4xx_visage_error():
    for exc in (EmptyImage, UnreadableImage, UnsupportedImageType, ImageTooLarge):
        assert issubclass(exc, VisageError) and 400 <= exc.status < 500


MUTATED = ["edge/obama.webp", "edge/obama_palette.png", "edge/obama_cmyk.jpg", "edge/obama_16bit_grey.png",
           "edge/obama_tiny_face.jpg", "edge/obama_exif_orientation6.jpg"]


@pytest.mark.parametrize("rel", MUTATED)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_damaged_real_file_decodes_or_is_a_4xx_error_never_anything_else(rel, data):
    """Real files with bytes flipped, cut short or spliced (what a flaky upload or a hostile client sends):
    each decodes to 8-bit RGB or raises a 4xx ``VisageError``, never another exception (a 500)."""
    raw = bytearray(photo(rel).read_bytes())
    for _ in range(data.draw(st.integers(0, 8), label="flips")):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="cut"):
        raw = raw[: data.draw(st.integers(1, len(raw)))]
    if data.draw(st.booleans(), label="splice"):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        img = decode_image(bytes(raw))
    except VisageError as exc:
        assert 400 <= exc.status < 500, exc
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
