"""Peak memory of decoding one large upload, by pixel mode: what ``VISAGE_MAX_PIXELS`` has to bound.

Each image (8000x5000 = 40 Mpx, the default pixel limit; ``--quick``: 2000x1250) is written once to a temporary
folder in the modes real uploads arrive in (RGB JPEG, RGBA and grey+alpha PNG, 16-bit grey PNG, 32-bit float
TIFF), then decoded by ``model.decode.decode_image`` in a fresh child process, which reports the rise of its peak
resident memory (VmHWM, reset through ``/proc/self/clear_refs`` just before the call) over its VmRSS then, with the
file's bytes already in memory (the service holds the upload too). The floor for any mode is the decoded source
plus the RGB result: Pillow keeps colour, alpha and float images at 4 bytes a pixel (153 MiB at 40 Mpx), 16-bit
grey at 2.

    python bench/decode_memory.py --out docs/BENCHMARKS.md
    python bench/decode_memory.py --quick     # smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import (
    REPO,
    command_line,
    emit,
    hwm_bytes,
    machine,
    machine_line,
    md_table,
    mib,
    parser,
    progress,
    rss_bytes,
)
from PIL import Image

MODES = {  # name -> (file name, writer of a width x height image)
    "RGB JPEG": ("rgb.jpg", lambda a: Image.fromarray(a[..., :3], "RGB").save, {"quality": 90}),
    "RGBA PNG": ("rgba.png", lambda a: Image.fromarray(a, "RGBA").save, {"compress_level": 1}),
    "grey+alpha PNG": ("la.png", lambda a: Image.fromarray(a[..., [0, 3]], "LA").save, {"compress_level": 1}),
    "16-bit grey PNG": ("g16.png", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257).save,
                        {"compress_level": 1}),
    "float TIFF": ("f.tif", lambda a: Image.fromarray(a[..., 0].astype(np.float32) / 7.0, "F").save, {}),
}


def pixels(width: int, height: int) -> np.ndarray:
    """A smooth gradient with a varying alpha (cheap to write, and every conversion has work to do)."""
    x = np.arange(width, dtype=np.uint32)[None, :]
    y = np.arange(height, dtype=np.uint32)[:, None]
    a = np.empty((height, width, 4), np.uint8)
    a[..., 0] = (x + y) % 256
    a[..., 1] = x % 256
    a[..., 2] = y % 256
    a[..., 3] = (x * 3) % 256
    return a


def measure_child(path: str) -> None:
    """(In the child) print the peak-RSS rise of one decode, in bytes."""
    from model.decode import DecodeLimits, decode_image

    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # peak := now (imports peaked higher than a small decode)
    before = rss_bytes()
    decode_image(data, DecodeLimits(max_bytes=len(data), max_pixels=10**9))
    print(hwm_bytes() - before)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # (internal) decode this file and report
    args = ap.parse_args()
    if args.child:
        measure_child(args.child)
        return
    width, height = (2000, 1250) if args.quick else (8000, 5000)
    info = machine(threads=1)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        source = pixels(width, height)
        for name, (file, writer, options) in MODES.items():
            path = Path(tmp) / file
            writer(source)(path, **options)
            progress(f"{name}: {path.stat().st_size / 1e6:.1f} MB file, decoding")
            done = subprocess.run([sys.executable, __file__, "--child", str(path)], cwd=REPO, capture_output=True,
                                  text=True, check=True)
            rise = int(done.stdout.split()[-1])
            results[name] = {"file_bytes": path.stat().st_size, "peak_rise_bytes": rise}
            rows.append([name, round(path.stat().st_size / 1e6, 1), round(mib(rise))])
    markdown = "\n\n".join([
        f"`{command_line()}`",
        machine_line(info),
        f"Peak resident memory added by decoding one {width}x{height} image ({width * height / 1e6:.0f} Mpx) to RGB:",
        md_table(["image", "file MB", "peak rise MiB"], rows, digits=1),
    ])
    emit("decode_memory", "Decoding memory per image", markdown, {"size": [width, height], **results}, args)


if __name__ == "__main__":
    main()
