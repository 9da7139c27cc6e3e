"""Download the wheels of the Python packages the training code needs and the GPU machine lacks (run here).

The device's image has PyTorch, numpy, Pillow, scikit-image, matplotlib and tqdm (/work/.library/device/KINDS.md)
but not pydantic, which checks every training setting (training/config.py). ``run.sh`` installs these wheels
into /tmp/site there. They are this venv's own versions, for the device's Python 3.12, into ``.gpu/wheels``
(carried with the payload: ~2.5 MiB).

Usage: python bench/gpu/wheels.py
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from payload import WHEELS, answer_help

DEVICE_LACKS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def main() -> None:
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("*.whl"):  # one version of each, or pip refuses the whole install there
        old.unlink()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *(f"{name}=={version(name)}" for name in DEVICE_LACKS)], check=True)
    sizes = {p.name: p.stat().st_size for p in sorted(WHEELS.glob("*.whl"))}
    print(sizes, f"total {sum(sizes.values()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    answer_help(__doc__)
    main()
