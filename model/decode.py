"""Bytes -> 8-bit RGB pixels, with every real-world quirk handled and every failure typed.

Handles EXIF orientation, palette/greyscale/CMYK/alpha modes and 16-bit PNGs (Pillow's plain
``convert("RGB")`` clips 16-bit values to white), and refuses decompression bombs from the header, before any
pixel is allocated.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import EmptyImage, ImageTooLarge, UnreadableImage, UnsupportedImageType

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO", "PPM"})  # PPM: .pgm/.ppm
# the file names the folder-reading commands (enroll, prepare, teacher-embed) take as photos of those formats
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".pgm", ".ppm", ".mpo"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # a 4000x2249 photo is 9 Mpx; a 20000x20000 bomb is 400 Mpx
# Pillow refuses to open anything over twice its MAX_IMAGE_PIXELS whatever we allow: the highest usable limit
PILLOW_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 0) or 2**62
# Below that Pillow only warns; the limit that counts is ours, checked from the header right after opening.
# Set once for the process: warnings.catch_warnings() per call is not thread-safe, and the service decodes on
# several threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
BACKGROUND = (128, 128, 128)  # transparent pixels become mid-grey, as on the training canvas


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def decode_image(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Decode an upload into an upright 8-bit RGB image, or raise a typed ``VisageError``."""
    limits = limits or DecodeLimits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UnreadableImage(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyImage("the file is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the file is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow's message quotes its own limit, not the one configured here; the size it names is the file's
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = declared[1] if declared else f"over {PILLOW_MAX_PIXELS}"
        raise ImageTooLarge(f"the image declares {size} pixels; the limit is {limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("the file is not an image in a format Visage can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"the image header is corrupt ({exc})") from exc
    if img.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageType(f"{img.format} images are not supported; send JPEG, PNG, WebP, BMP, TIFF, GIF or "
                                   "PGM/PPM")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if width < 1 or height < 1:
        raise UnreadableImage("the image has no pixels")
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # (a copy would hold a second full image: +150 MB at 40 Mpx)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"the image data is corrupt or truncated ({exc})") from exc
    try:
        return to_rgb8(img)
    except (OSError, ValueError) as exc:  # a pixel mode Pillow cannot convert: the upload's fault, not a 500
        raise UnreadableImage(f"the image's pixel format ({img.mode}) cannot be read ({exc})") from exc


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16-bit and float greys are rescaled, alpha composited on grey.

    Conversions that need temporaries (rescaling, compositing) run on bands of rows, so a 40-Mpx image costs
    its own pixels and the RGB result, not several full-size float or RGBA copies (a 40-Mpx RGBA PNG's peak: +764
    -> +326 MiB, bench/decode_memory.py).
    """
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        return _in_bands(img, _grey_to_rgb8(img))
    if img.mode in {"La", "RGBa"}:  # premultiplied alpha (TIFF "associated"): Pillow cannot convert La at all
        return _in_bands(img, _premultiplied_on_grey)
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        return _in_bands(img, _alpha_on_grey)
    return img.convert("RGB")


BAND_PIXELS = 1 << 20  # a band of about 1 Mpx: its temporaries are a few MiB whatever the image's size


def _bands(img: Image.Image) -> list[tuple[int, int, int, int]]:
    rows = max(1, BAND_PIXELS // img.width)
    return [(0, top, img.width, min(img.height, top + rows)) for top in range(0, img.height, rows)]


def _in_bands(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``convert`` applied to each band of rows, pasted into one RGB image."""
    out = Image.new("RGB", img.size)
    for box in _bands(img):
        out.paste(convert(img.crop(box)), box[:2])  # (crop keeps the palette and its transparency)
    return out


def _grey_to_rgb8(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The band conversion for 16/32-bit and float greys; the scale is the whole image's, found in a first pass."""
    lo, hi, brightest = np.inf, -np.inf, 0
    for box in _bands(img) if img.mode in {"I", "F"} else ():
        arr = np.asarray(img.crop(box))
        if img.mode == "I":
            brightest = max(brightest, int(arr.max()))
        else:  # (scaled by the finite values: one NaN or inf pixel blanked the whole image)
            finite = arr[np.isfinite(arr)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not np.isfinite(lo):
        lo = hi = 0.0
    eight_bit = img.mode == "I" and brightest <= 255  # 8-bit data stored as 32-bit int

    def convert(band: Image.Image) -> Image.Image:
        arr = np.asarray(band)
        if img.mode == "F":
            arr = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo or 1.0) * 255.0
        elif not eight_bit:
            arr = arr.astype(np.uint32) >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")

    return convert


def _premultiplied_on_grey(band: Image.Image) -> Image.Image:
    arr = np.asarray(band, dtype=np.float32)
    colour, alpha = arr[..., :-1], arr[..., -1:] / 255.0
    background = np.asarray(BACKGROUND, np.float32)[: colour.shape[-1]]
    out = np.clip(colour + background * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out[..., 0] if band.mode == "La" else out, "L" if band.mode == "La" else "RGB").convert(
        "RGB")


def _alpha_on_grey(band: Image.Image) -> Image.Image:
    rgba = band.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def read_limited(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes, or ``ImageTooLarge`` after reading at most ``max_bytes + 1`` of them: a stray
    multi-gigabyte file among the photos must cost one refusal, not the machine's memory."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the file is larger than the limit of {max_bytes} bytes")
    return data


def read_image_file(path: str | os.PathLike[str], limits: DecodeLimits | None = None) -> Image.Image:
    """Decode a file from disk through exactly the same checks as an upload."""
    limits = limits or DecodeLimits()
    return decode_image(read_limited(path, limits.max_bytes), limits)
