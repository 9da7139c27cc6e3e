"""The training commands' errors on small real files: one line (one JSON object with --json) and exit 2, found
before the work whose result would be lost, naming the option or file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.bundle import bundle_from_model, save_bundle
from model.console import main
from model.mobilenet import ModelConfig, build_model
from training.paths import shared_data, teacher_reference
from training.teacher import TeacherCache

SMALL = ModelConfig("mobilenet_v1", 0.25, 112, 128)
FACE = shared_data() / "lfw/images/Colin_Powell/Colin_Powell_0001.jpg"  # a 160x160 crop, as the teacher takes
READ_ONLY = Path("/sys")  # not writable even by root, whom a chmod 555 folder does not stop


def _bundle(path: Path, config: ModelConfig = SMALL) -> Path:
    return save_bundle(bundle_from_model(build_model(config), config), path)


def _run(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def unwritable(tmp_path) -> list[tuple[Path, str]]:
    """Paths that cannot be written, each with the reason the error should give."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    cases = [(tmp_path / "notes.txt" / "out.x", f"{tmp_path / 'notes.txt'} is a file, not a folder")]
    if READ_ONLY.is_dir():
        cases.append((READ_ONLY / "visage-test.x", "Permission denied"))
    return cases


def test_calibrate_and_soup_check_out_before_calibrating(tmp_path, capsys, monkeypatch, unwritable):
    """The check came after the calibration's minutes of embedding, and torch.save's RuntimeError was a
    traceback with exit 1 and nothing on stdout."""
    import training.loop

    def never(*args, **kwargs):
        raise AssertionError("calibrated before --out was checked")

    monkeypatch.setattr(training.loop, "load_split", never)
    monkeypatch.setattr(training.loop, "calibrate_bundle", never)
    a = b = _bundle(tmp_path / "a.pt", ModelConfig())  # (the default settings' network: calibrate goes on to the data)
    for out, why in unwritable:
        for argv in (["calibrate", "--weights", str(a)], ["soup", str(a), str(b)]):
            code, err = _run(capsys, *argv, "--out", str(out))
            assert code == 2 and err["detail"] == f"cannot write --out {out}: {why}", (argv, err)


def test_soup_names_the_two_networks_files_and_tells_settings_from_weights(tmp_path, capsys):
    """"cannot average ModelConfig(...) with ModelConfig(...)" named no file, in the reverse order; a calibrate-style
    KEY=VALUE was "weights file not found: score_cohort=8"."""
    a, b = _bundle(tmp_path / "a.pt"), _bundle(tmp_path / "b.pt", ModelConfig("mobilenet_v1", 0.5, 112, 128))
    code, err = _run(capsys, "soup", str(a), str(b), "--out", str(tmp_path / "s.pt"))
    assert code == 2 and err["detail"].startswith(f"cannot average {a} ({SMALL}) with {b} (ModelConfig(")
    code, err = _run(capsys, "soup", str(a), str(a), "score_cohort=8", "--out", str(tmp_path / "s.pt"))
    assert code == 2 and err["detail"].endswith("settings go with --set: --set score_cohort=8")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("kind", ["the shipped reference", "a damaged zip", "text", "a lone array"])
def test_a_file_that_is_not_a_teacher_cache_is_one_error_naming_it(tmp_path, capsys, kind):
    """The shipped reference npz (an obvious mistake) was a KeyError traceback, a damaged zip a BadZipFile one,
    and a text file got numpy's advice to load it with allow_pickle."""
    path = tmp_path / "cache.npz"
    if kind == "the shipped reference":
        path = teacher_reference()
    elif kind == "a damaged zip":
        path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    elif kind == "text":
        path.write_text("garbage\n")
    else:
        np.save(tmp_path / "cache.npy", np.zeros(3))
        (tmp_path / "cache.npy").rename(path)
    with pytest.raises(ValueError, match=f"^{path} is not a teacher cache written by `visage teacher-embed`"):
        TeacherCache.load(path)
    folder = tmp_path / "faces"
    folder.mkdir()
    shutil.copy(FACE, folder)
    code, err = _run(capsys, "teacher-embed", str(folder), "--cache", str(path))
    assert code == 2 and err["error"] == "invalid_value" and err["detail"].startswith(f"{path} is not a teacher")
    assert "pickle" not in err["detail"]


def test_teacher_embed_checks_the_cache_before_computing_any_descriptor(tmp_path, capsys, monkeypatch, unwritable):
    """All the descriptors were computed first, then lost at the save, whose error named the .tmp.npz file."""
    import training.teacher

    def never():
        raise AssertionError("descriptors computed before --cache was checked")

    monkeypatch.setattr(training.teacher, "DlibTeacher", never)
    monkeypatch.setenv("VISAGE_TEACHER_NPZ", str(tmp_path / "none.npz"))  # (no reference rows: all are new)
    folder = tmp_path / "faces"
    folder.mkdir()
    shutil.copy(FACE, folder)
    for out, why in unwritable:
        code, err = _run(capsys, "teacher-embed", str(folder), "--cache", str(out))
        assert code == 2 and err["detail"] == f"cannot write --cache {out}: {why}", err
