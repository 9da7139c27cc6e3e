"""The benchmark scripts' command line (bench/common.py): mistakes are one line, before anything is measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/closed_set.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    """--out pointing at a folder, or into a missing one, was a traceback after the whole benchmark had run."""
    for out, why in [(tmp_path, "is a folder"), (tmp_path / "missing" / "x.md", "is not a folder")]:
        done = bench("--out", str(out))
        assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_weights_that_are_not_a_bundle_are_one_line(tmp_path):
    junk = tmp_path / "w.pt"
    junk.write_bytes(b"not a bundle")
    done = bench("--weights", str(junk))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {junk} is not a Visage weights bundle (torch.load: "
                                                "UnpicklingError; a damaged bundle, or another kind of file)"]
