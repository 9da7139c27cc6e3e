"""Where the GPU run's payload lives and which recipe it is packed for: one place for pack, unpack, launch, epochs."""

from pathlib import Path

PAYLOAD = Path(__file__).resolve().parents[2] / ".gpu" / "payload"  # git-ignored; carried to the device
WHEELS = PAYLOAD.parent / "wheels"  # packages the device lacks (wheels.py), carried with the payload
CONFIG = "training/configs/gpu.toml"
