"""The ``visage`` console script (model.console) and the model package's subcommands (model.commands)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo

from model.bundle import bundle_from_model, load_bundle, save_bundle
from model.console import main
from model.cost import mobilenet_v1_cost
from model.mobilenet import ModelConfig, build_model

# the console script installed beside this interpreter (the project's venv), else the one on PATH
VISAGE = shutil.which("visage", path=str(Path(sys.executable).parent)) or shutil.which("visage")


def visage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert VISAGE, "the visage console script is not installed (pip install -e .)"
    return subprocess.run([VISAGE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    config = ModelConfig()
    path = tmp_path_factory.mktemp("cli") / "fresh.pt"
    return save_bundle(bundle_from_model(build_model(config), config, {"model_version": "fresh-cli"}), path)


def test_help_lists_every_subcommand():
    result = visage("--help")
    assert result.returncode == 0
    for command in ("cost", "embed", "compare", "prepare", "teacher-embed", "train", "calibrate", "soup", "eval"):
        assert command in result.stdout


def test_cost_json_is_the_cost_report():
    result = visage("cost", "--alpha", "0.5", "--resolution", "112", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = mobilenet_v1_cost(0.5, 112).to_dict()
    assert out["mult_adds"] == expected["mult_adds"] and out["params"] == expected["params"]
    assert out["alpha"] == 0.5 and out["resolution"] == 112
    assert len(out["layers"]) == 28 and out["layers"][0]["output_size"] == 56
    assert {"name", "kind", "mult_adds", "params", "output_size"} <= set(out["layers"][0])


def test_cost_table_prints_every_layer_and_the_paper_totals(capsys):
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    for name in ("conv0", "conv1_dw", "conv13_pw", "fc", "total"):
        assert name in out
    assert "568,740,352" in out and "4,210,088" in out  # 569M mult-adds, 4.2M params
    assert "568.7M mult-adds" in out


def test_cost_embedding_head_and_full_convolution_options(capsys):
    assert main(["cost", "--head", "embedding", "--embedding-dim", "64", "--alpha", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["head"] == "embedding" and out["layers"][-1]["out_channels"] == 64
    assert main(["cost", "--standard-conv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mult_adds"] == mobilenet_v1_cost(standard_conv=True).mult_adds


def test_cost_bad_alpha_is_a_clean_user_error(capsys):
    assert main(["cost", "--alpha", "0"]) == 2
    captured = capsys.readouterr()
    assert "alpha must be in (0, 1]" in captured.err and "Traceback" not in captured.err
    assert main(["cost", "--alpha", "1.5", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "invalid_config"


def test_a_usage_error_with_json_is_json_too(capsys):
    """argparse's own refusals (a value of the wrong type, an unknown option) printed usage only: a script that
    asked for --json got nothing on stdout."""
    for argv, message in ((["cost", "--json", "--alpha", "x"], "invalid float value: 'x'"),
                          (["cost", "--json", "--bogus"], "unrecognized arguments: --bogus")):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert json.loads(out) == {"error": "usage", "detail": json.loads(out)["detail"]} and message in out
        assert err.startswith("usage: visage cost") and message in err  # the command's usage, not "visage COMMAND"
        assert "visage cost: error: " in err
    assert main(["cost", "--alpha", "x"]) == 2
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty as before


@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize("argv", [["cost", "--json"], ["cost", "--json", "--alpha", "x"], ["cost"]])
def test_a_reader_that_goes_away_is_not_a_traceback(argv, unbuffered):
    """`visage cost --json | head -1`: the pipe closes before the output is written; was two BrokenPipeError
    tracebacks (the second from printing the error), or with a buffered stdout "Exception ignored" and exit 120."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
    proc = subprocess.Popen([sys.executable, "-m", "model.console", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "Exception ignored" not in err, err
    # (a table, ["cost"], exited 1: rich's console turns a broken pipe into exit 1, "done in part" to a script)


def test_a_full_disk_under_stdout_is_one_line_and_status_2_not_a_traceback():
    """`visage cost --json > /dev/full`: the error handler printed its JSON to the same full stdout and died."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "model.console", "cost", "--json"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device" in result.stderr


def test_embed_on_corrupt_files_exits_non_zero_and_json_says_why(weights):
    truncated, text = photo("edge/bad/truncated.jpg"), photo("edge/bad/not_an_image.jpg")
    result = visage("embed", "--weights", str(weights), "--json", str(truncated), str(text))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    out = json.loads(result.stdout)
    assert out["model_version"] == "fresh-cli" and out["dim"] == 128
    first, second = out["images"]
    assert first["image"] == str(truncated) and first["error"] == "unreadable_image"
    assert "truncated" in first["detail"]
    assert second["image"] == str(text) and second["error"] == "unreadable_image" and second["detail"]


def test_embed_table_names_the_problem(weights, capsys):
    assert main(["embed", "--weights", str(weights), str(photo("edge/bad/truncated.jpg"))]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "truncated" in out


def test_embed_json_mixes_errors_and_faces(weights, capsys):
    bad, good = photo("edge/bad/not_an_image.jpg"), photo("edge/obama_tiny_face.jpg")
    # one image failed: status 1, as enroll and prepare say "some files failed" (it was 0 while any image worked)
    assert main(["embed", "--weights", str(weights), "--json", str(bad), str(good)]) == 1
    first, second = json.loads(capsys.readouterr().out)["images"]
    assert first["error"] == "unreadable_image"
    assert second["image"] == str(good) and len(second["faces"]) == 1
    face = second["faces"][0]
    assert len(face["embedding"]) == 128 and abs(sum(v * v for v in face["embedding"]) - 1) < 1e-3
    assert 20 <= face["size"] <= 32


def test_embed_exit_status_when_every_image_fails(weights, capsys):
    code = main(
        ["embed", "--weights", str(weights), "--json", str(photo("edge/bad/empty.jpg")), "/no/such.jpg"]
    )
    assert code != 0
    out = json.loads(capsys.readouterr().out)
    assert [i["error"] for i in out["images"]] == ["empty_image", "file_not_found"]


def test_embed_reads_a_pipe_and_calls_an_empty_device_empty(weights):
    """`cat obama.jpg | visage embed /dev/stdin`, `visage embed <(curl ...)`: a pipe is not a regular file, and
    was reported as "no such file: /dev/stdin"; /dev/null too, which exists and is empty."""
    result = subprocess.run([VISAGE, "embed", "--weights", str(weights), "--json", "/dev/stdin", "/dev/null"],
                            input=photo("obama.jpg").read_bytes(), capture_output=True, timeout=120)
    assert result.returncode == 1, result.stderr  # /dev/null failed
    piped, null = json.loads(result.stdout)["images"]
    assert piped["image"] == "/dev/stdin" and len(piped["faces"]) == 1, piped
    assert null["error"] == "empty_image", null


def test_compare_refuses_an_uncalibrated_far_before_reading_the_photos(weights, tmp_path, capsys):
    """A --far the weights lack was checked only after both photos were embedded, so a photo's own error (no face
    here) hid it, and the fix of one revealed the other."""
    from model.bundle import load_bundle

    bundle = load_bundle(weights)
    bundle.metadata["thresholds"] = {"1e-3": 0.3}
    calibrated = save_bundle(bundle, tmp_path / "calibrated.pt")
    code = main(["compare", "--weights", str(calibrated), "--far", "1e-5", "--json", str(photo("obama.jpg")),
                 str(photo("nonface/coffee.jpg"))])
    assert code == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "invalid_value" and "1e-5" in out["detail"], out


def test_embed_with_missing_weights_is_a_clean_error(tmp_path, capsys):
    assert main(["embed", "--weights", str(tmp_path / "none.pt"), str(photo("obama.jpg"))]) == 2
    assert "weights file not found" in capsys.readouterr().err


def test_export_never_overwrites_its_own_weights_and_names_bad_paths(weights, tmp_path, capsys):
    """`visage export --weights W --onnx W` replaced the bundle with its ONNX graph (exit 0; the weights were gone);
    a folder, or a path under a file, gave errno text ("File exists: 'photo.jpg'")."""
    bundle = shutil.copy(weights, tmp_path / "w.pt")
    before = Path(bundle).read_bytes()
    assert main(["export", "--weights", str(bundle), "--onnx", str(bundle), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "is the weights bundle being exported" in out["detail"] and Path(bundle).read_bytes() == before
    assert main(["export", "--weights", str(bundle), "--onnx", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    a_file = tmp_path / "photo.jpg"
    a_file.write_bytes(b"x")
    assert main(["export", "--weights", str(bundle), "--onnx", str(a_file / "w.onnx")]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err


def test_compare_reports_similarity_against_the_threshold(weights, capsys):
    args = ["compare", "--weights", str(weights), str(photo("obama.jpg")), str(photo("multi/two_people.jpg"))]
    assert main([*args, "--threshold", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert -1.0 <= out["similarity"] <= 1.0 and out["threshold"] == 0.25
    assert out["match"] == (out["similarity"] >= 0.25)
    assert out["model_version"] == "fresh-cli" and out["face2"]["size"] > 100  # the largest face was taken
    assert out["far"] is None  # an explicit threshold, as /compare says it
    assert main(args) == 0  # uncalibrated weights: the fallback threshold, printed as a sentence
    assert "score" in capsys.readouterr().out


def test_compare_json_names_the_operating_point_as_the_api_does(capsys):
    """/compare answered "far"; `visage compare --json` did not say which threshold it had used."""
    pair = [str(photo("obama.jpg")), str(photo("obama2.jpg"))]
    assert main(["compare", *pair, "--far", "0.0001", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["far"] == "1e-4" and out["threshold"] == round(load_bundle().threshold("1e-4"), 4)


def test_compare_without_a_face_is_a_clean_error(weights, capsys):
    code = main(
        ["compare", "--weights", str(weights), str(photo("obama.jpg")), str(photo("nonface/coffee.jpg"))]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no face" in err and "coffee.jpg" in err  # which of the two images


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--threshold", "nan", "a.jpg", "b.jpg"], "expected a finite number written with the digits"),
        (["compare", "--threshold", "1_0", "a.jpg", "b.jpg"], "expected a finite number written with the digits"),
        (["compare", "--threshold", "2.5", "a.jpg", "b.jpg"], "--threshold is a score in [-2, 2]"),
        (["cost", "--head", "embedding", "--embedding-dim", "-5"], "--embedding-dim must be from 8 to 4096"),
        (["eval", "--pairs", "{folder}", "--images", "{folder}"], "Is a directory"),
        (["eval", "--pairs", "p.txt", "--images", "x", "--roc", "{folder}/roc.txt"], "cannot write a figure"),
        (["eval", "--pairs", "{pairs}", "--images", "x", "--roc", "/dev/null/roc.png"], "cannot write --roc"),
        (["eval", "--pairs", "{pairs}", "--images", "{folder}/nosuch"], "no such folder"),
        (["soup", "--set", "score_k=4", "{folder}/a.pt", "--out", "{folder}/x.pt"], "weights file not found"),
        (["eval", "--pairs", "p.txt", "--images", "x", "--teacher", "dlib", "--weights", "w.pt"],
         "--weights and --prepared are the student's options"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_json_says_why(tmp_path, capsys, args, message):
    """Whatever is wrong (a value, a folder where a file belongs), a clear message and exit code 2, and with
    --json one parseable object with a snake_case code: never a traceback, never NaN in the output."""
    (tmp_path / "pairs.txt").write_text("2\t1\nA\t1\t2\nA\t1\tB\t1\nC\t1\t2\nC\t1\tD\t1\n")  # 2 folds
    args = [a.replace("{folder}", str(tmp_path)).replace("{pairs}", str(tmp_path / "pairs.txt")) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert main([*args, "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert message in out["detail"] and re.fullmatch("[a-z_]+", out["error"])


def test_bad_training_settings_and_counts_are_one_line_errors(tmp_path, capsys):
    """A wrong type or range in a setting was a traceback deep in the loop (threads=abc) or a useless run
    (epochs=-3); a count of 0 workers or steps silently meant "the default" or "no cap"."""
    config = ["train", "--config", "training/configs/default.toml", "--run-dir", str(tmp_path)]
    assert main([*config, "threads=abc", "epochs=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "threads='abc': Input should be a valid integer" in err and "epochs=-3: Input should be greater" in err
    assert main([*config, "pairs=nosuch.txt"]) == 2  # named no setting, and not where relative paths are read
    assert "pairs=nosuch.txt: No such file or directory" in capsys.readouterr().err
    for args in (["prepare", str(tmp_path), str(tmp_path / "out"), "--workers", "0"], [*config, "--max-steps", "0"]):
        assert main(args) == 2
        assert "must be at least 1, got 0" in capsys.readouterr().err


def test_error_codes_are_snake_case_and_json_is_strict(capsys):
    import tomllib

    from model.console import error_code, print_json

    assert error_code(OSError("x")) == "os" and error_code(FileNotFoundError()) == "file_not_found"
    assert error_code(json.JSONDecodeError("x", "", 0)) == "json_decode"
    assert error_code(tomllib.TOMLDecodeError("x")) == "toml_decode" and error_code(ValueError()) == "invalid_value"
    print_json({"auc": float("nan"), "rows": [1.5, float("inf")], "n": np.float32(0.25)})
    assert json.loads(capsys.readouterr().out) == {"auc": None, "rows": [1.5, None], "n": 0.25}


def test_embed_of_a_folder_says_so(tmp_path, capsys):
    assert main(["embed", str(tmp_path), "--json"]) == 1  # (every image failed)
    image = json.loads(capsys.readouterr().out)["images"][0]
    assert image["error"] == "is_a_directory" and "is a folder, not an image file" in image["detail"]


def test_soup_set_takes_one_setting_each_and_leaves_the_bundles_alone():
    from model.console import build_parser

    args = build_parser().parse_args(["soup", "--set", "score_k=4", "a.pt", "b.pt", "--set", "score_cohort=0",
                                      "--out", "x.pt"])
    assert [str(w) for w in args.weights] == ["a.pt", "b.pt"]
    assert args.overrides == ["score_k=4", "score_cohort=0"]


def test_a_checkout_that_was_never_installed_still_has_every_command(monkeypatch):
    """No ``visage.commands`` entry points (a source checkout run with another Python, as on a GPU machine):
    the same registrars come from pyproject.toml."""
    import model.console as console

    installed = console.command_registrars()
    monkeypatch.setattr(console, "entry_points", lambda group: [])
    def names(registrars):
        return sorted(f"{r.__module__}:{r.__name__}" for r in registrars)

    assert names(console.command_registrars()) == names(installed) == [
        "app.commands:register", "model.commands:register", "training.commands:register"]
    commands = console.build_parser()._subparsers._group_actions[0].choices
    assert {"train", "eval", "serve", "embed", "cost"} <= set(commands)
