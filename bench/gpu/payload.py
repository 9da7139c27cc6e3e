"""Where the GPU run's payload lives and which recipe it is packed for: one place for pack, unpack, launch, epochs."""

import sys
from pathlib import Path

PAYLOAD = Path(__file__).resolve().parents[2] / ".gpu" / "payload"  # git-ignored; carried to the device
WHEELS = PAYLOAD.parent / "wheels"  # packages the device lacks (wheels.py), carried with the payload
CONFIG = "training/configs/gpu.toml"


def answer_help(doc: str | None) -> None:
    """``-h`` / ``--help``: print the script's docstring and stop. These scripts take run.sh's positional arguments
    and have no parser: ``pack.py --help`` was a traceback, and ``wheels.py`` and ``unpack.py`` ran."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print((doc or "").strip())
        raise SystemExit(0)
