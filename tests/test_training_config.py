"""training.config: TOML file + key=value overrides -> a validated TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training
from model.errors import InvalidConfig
from model.mobilenet import ModelConfig
from training.config import TrainConfig, load_config

DEFAULT_TOML = Path(training.__file__).parent / "configs" / "default.toml"

SECTIONED = """
[data]
pairs = "lfw/pairs_dev.txt"
val_folds = [7, 8]

[model]
alpha = 0.25
resolution = 96

[optimisation]
epochs = 30
p = 16
k = 4
"""


def test_the_shipped_recipe_loads_and_builds_the_default_model():
    cfg = load_config(DEFAULT_TOML)
    assert cfg.model == ModelConfig()
    assert cfg.miner == "batch_hard" and cfg.val_folds == [7, 8]
    assert cfg.prepared == {"lfw": "prepared/lfw", "celeba": "prepared/celeba"}


@pytest.mark.parametrize("path", sorted(DEFAULT_TOML.parent.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_start_weights_fit(path):
    """Each stage's config validates, and a fine-tune's ``init_weights`` in the repo loads into its network."""
    cfg = load_config(path)
    if cfg.init_weights.startswith("model/weights/"):
        from model.mobilenet import build_model
        from training.loop import initial_weights

        build_model(cfg.model).load_state_dict(initial_weights(cfg))


def test_no_file_gives_the_defaults():
    assert load_config() == TrainConfig()


def test_file_plus_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(SECTIONED)
    cfg = load_config(path, ["epochs=3", "miner=semi_hard", "val_folds=[1]"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.miner == "semi_hard"
    assert cfg.val_folds == [1]
    assert (cfg.alpha, cfg.resolution, cfg.p, cfg.k) == (0.25, 96, 16, 4)  # from the file
    assert cfg.model == ModelConfig("mobilenet_v1", 0.25, 96, 128)


def test_override_values_are_typed_like_toml():
    cfg = load_config(
        None, ["lr=0.01", "amp=false", " margin = 0.3 ", "pairs=lfw/other.txt", 'prepared={lfw = "x/lfw"}']
    )
    assert cfg.lr == 0.01 and cfg.amp is False and cfg.margin == 0.3
    assert cfg.pairs == "lfw/other.txt"  # a bare string is kept as written
    assert cfg.prepared == {"lfw": "x/lfw"}


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(None, ["epoch=3"])
    path = tmp_path / "typo.toml"
    path.write_text("[optimisation]\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("miner=hardest", "miner"),
        ("optimizer=rmsprop", "optimizer"),
        ("k=1", "K >= 2"),
        ("w_triplet=-1", "w_triplet=-1: Input should be greater than or equal to 0"),
        ("w_relation=-0.5", "w_relation"),
        ("w_proxy=-1", "w_proxy"),
        ("augment_geometry=-1", "augment_geometry"),
        ("augment_geometry=5", "augment_geometry"),
        ("augment_geometry=true", "augment_geometry"),
        ("val_every=0", "val_every"),
        ("val_every=1.5", "val_every"),
        ("w_proxy=0.1 proxy_margin=1", "proxy_margin"),
        ("w_proxy=0.1 proxy_scale=0", "proxy_scale"),
        ("w_proxy=0.1 teacher_center=false", "teacher_center"),
        ("w_bank=0.5 teacher_center=false", "w_bank needs teacher_center"),
        ("w_bank=0.5 bank_temperature=0", "bank_temperature"),
        ("w_triplet=0 w_distill=0 w_bank=-1", "w_bank"),
        ("epochs3", "key=value"),
        ("test_time_shift=-1", "test_time_shift"),
        ("test_time_shift=15", "test_time_shift"),
        ("test_time_shift=1.5", "test_time_shift"),
        ("test_time_shift=true", "test_time_shift"),
        # every field's type and range, one line each (these were tracebacks, or a silent useless run)
        ("threads=abc", "threads='abc': Input should be a valid integer"),
        ("threads=-1", "threads=-1: Input should be greater than or equal to 0"),
        ('prepared="x"', "prepared='x': Input should be a valid dictionary"),
        ("epochs=1.5", "epochs=1.5: Input should be a valid integer"),
        ("epochs=0", "epochs=0: Input should be greater than or equal to 1"),
        ("seed=abc", "seed='abc'"),
        ("margin=-5", "margin"),
        ('lr="fast"', "lr='fast': Input should be a valid number"),
        ("lr=-1", "lr=-1: Input should be greater than or equal to 0"),
        ("score_k=0", "score_k"),
        ("score_cohort=-5", "score_cohort"),
        ("p=1", "p=1"),
        ("mixup=true teacher_mode=online", "mixup=True: Input should be a valid number"),
        # inf passed every range (warmup_epochs=inf: OverflowError traceback; lr=inf: an epoch of NaNs, then an error)
        ("warmup_epochs=inf", "warmup_epochs=inf: Input should be a finite number"),
        ("lr=inf", "lr=inf: Input should be a finite number"),
        ("margin=inf", "margin=inf"),
        ("w_distill=inf", "w_distill=inf"),
        ("lr=nan", "lr=nan"),
        ("prepared={}", "prepared={}: Dictionary should have at least 1 item"),
    ],
)
def test_bad_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override.split(" "))


def test_bad_model_knobs_are_refused():
    with pytest.raises(InvalidConfig):
        load_config(None, ["alpha=1.5"])
    with pytest.raises(InvalidConfig):
        load_config(None, ["backbone=resnet"])


def test_distillation_only_runs_need_no_pairs_of_images():
    cfg = load_config(None, ["w_triplet=0", "k=1"])
    assert cfg.k == 1 and cfg.w_triplet == 0


def test_a_run_needs_some_loss_and_reads_the_teacher_only_when_a_term_uses_it():
    with pytest.raises(ValueError, match="must not all be 0"):
        load_config(None, ["w_triplet=0", "w_distill=0"])
    assert not load_config(None, ["w_distill=0"]).uses_teacher
    relation_only = load_config(None, ["w_triplet=0", "w_distill=0", "w_relation=10", "k=1"])
    assert relation_only.uses_teacher
    assert load_config(None, ["w_distill=0", "w_proxy=0.1"]).uses_teacher  # the proxies are teacher centroids


def test_a_flat_file_without_sections(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('epochs = 5\nalpha = 0.25\nprepared = { lfw = "p/lfw" }\n')
    cfg = load_config(path)
    assert (cfg.epochs, cfg.alpha, cfg.prepared) == (5, 0.25, {"lfw": "p/lfw"})


def test_top_level_keys_beside_sections(tmp_path):
    """Valid TOML: keys before the first table. The loader must not take the tables for settings."""
    path = tmp_path / "mixed.toml"
    path.write_text("epochs = 5\n\n[model]\nalpha = 0.25\n")
    cfg = load_config(path)
    assert (cfg.epochs, cfg.alpha) == (5, 0.25)


def test_a_flat_file_whose_only_setting_is_a_table(tmp_path):
    """``prepared`` is itself a table: a file holding only it must not be read as a section of settings."""
    path = tmp_path / "only_prepared.toml"
    path.write_text('prepared = { lfw = "p/lfw" }\n')
    assert load_config(path).prepared == {"lfw": "p/lfw"}


@pytest.mark.parametrize("override", ["val_folds=[0]", "val_folds=7", "val_folds=[]"])
def test_val_folds_must_be_a_list_of_1_based_fold_numbers(override):
    """Caught late otherwise: [0] names fold -1 (no validation pairs, so the first validation after a whole
    epoch fails), 7 (not a list) fails with a TypeError inside load_split."""
    with pytest.raises(ValueError, match="val_folds"):
        load_config(None, [override])


def test_a_broken_or_binary_config_file_is_named(tmp_path):
    broken, binary = tmp_path / "broken.toml", tmp_path / "binary.toml"
    broken.write_text("epochs = \n")
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"broken.toml is not valid TOML: Invalid value \(at line 1"):
        load_config(broken)
    with pytest.raises(ValueError, match="binary.toml is not a TOML config: not UTF-8 text"):
        load_config(binary)


def test_resume_needs_a_checkpoint_and_max_steps_a_positive_count(tmp_path):
    """A mistyped run folder with --resume used to start a fresh run of hours; --max-steps 0 a full epoch."""
    from training.loop import train

    with pytest.raises(FileNotFoundError, match="nothing to resume: no checkpoint .*last.pt"):
        train(load_config(), tmp_path / "typo", resume=True)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        train(load_config(), tmp_path / "run", max_steps=0)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError, match="--run-dir .*a_file is a file: give a folder"):
        train(load_config(), tmp_path / "a_file")


def _checkpoint(path: Path, epoch: int = 0, **config) -> None:
    """A run's last.pt as `visage train` writes it (``epoch``: the last one done, 0-based), with only what
    resuming reads before any data loads."""
    import torch

    cfg = {**load_config().to_dict(), **config}
    torch.save({"model": {}, "opt": {}, "sched": {}, "config": cfg, "epoch": epoch, "history": []}, path)


@pytest.mark.parametrize("epochs", [1, 3])
def test_resuming_a_run_that_has_done_its_epochs_says_so_and_points_to_export(tmp_path, capsys, epochs):
    """It exited 0 having trained nothing, with only "weights bundle: RUN/bundle.pt" (written again) to show. (With
    no bundle.pt newer than last.pt, a run stopped after its last checkpoint, it still finishes: writes it.)"""
    from model.console import main

    _checkpoint(tmp_path / "last.pt", epoch=2)  # 3 epochs done
    (tmp_path / "bundle.pt").write_bytes(b"the finished run's bundle")
    assert main(["train", "--run-dir", str(tmp_path), "--resume", f"epochs={epochs}"]) == 2
    err = capsys.readouterr().err
    assert "has trained its 3 epochs and its bundle.pt is written: nothing to do" in err
    assert len(err.splitlines()) == 1 and (tmp_path / "bundle.pt").read_bytes() == b"the finished run's bundle"


def test_a_typo_in_a_config_file_is_named_with_its_close_match_and_the_known_keys(tmp_path):
    """The file said only "unknown settings ['epoch']"; the same typo on the command line listed every key."""
    path = tmp_path / "typo.toml"
    path.write_text("[optimisation]\nepoch = 3\n")
    said = r"unknown setting 'epoch' \(did you mean 'epochs'\?\).*; known: prepared, "
    for args in [(path,), (None, ["epoch=3"])]:
        with pytest.raises(ValueError, match=said):
            load_config(*args)
    with pytest.raises(ValueError, match=f"in {path}; known: "):
        load_config(path)


def test_a_missing_config_or_pairs_file_names_its_option(tmp_path, capsys):
    """Both were a bare "[Errno 2] No such file or directory: 'nope.toml'"."""
    from model.console import main

    nope = tmp_path / "nope.toml"
    assert main(["train", "--config", str(nope), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"error: --config {nope}: No such file or directory" in capsys.readouterr().err
    pairs = tmp_path / "nope.txt"
    assert main(["eval", "--pairs", str(pairs), "--images", str(tmp_path), "--roc", str(tmp_path / "roc.png"),
                 "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out == {"error": "file_not_found", "detail": f"--pairs {pairs}: No such file or directory"}


def test_a_damaged_or_foreign_checkpoint_is_one_line_for_resume_and_export(tmp_path, capsys):
    """A text file, an empty file or a bundle as last.pt were UnpicklingError / EOFError / KeyError tracebacks."""
    import shutil

    from model.bundle import DEFAULT_WEIGHTS
    from model.console import main

    run = tmp_path / "run"
    run.mkdir()
    for content, says in [(b"not a checkpoint", "not a readable training checkpoint"), (b"", "not a readable"),
                          (None, "not a training checkpoint of `visage train` (it is a weights bundle)")]:
        if content is None:
            shutil.copy(DEFAULT_WEIGHTS, run / "last.pt")
        else:
            (run / "last.pt").write_bytes(content)
        for flag in ("--resume", "--export"):
            assert main(["train", "--run-dir", str(run), flag]) == 2
            err = capsys.readouterr().err
            assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, (flag, err)


def test_export_takes_no_training_settings(tmp_path, capsys):
    from model.console import main

    _checkpoint(tmp_path / "last.pt")
    assert main(["train", "--run-dir", str(tmp_path), "--export", "epochs=abc"]) == 2
    assert "--export turns RUN_DIR/last.pt into a bundle with the run's own settings" in capsys.readouterr().err


def test_resume_keeps_the_runs_own_settings_and_refuses_another_optimizer(tmp_path):
    """Without --config a resumed run fell back to the built-in defaults (another recipe half-way); a changed
    optimizer was a KeyError traceback from torch after config.json had been overwritten."""
    import argparse

    from training.commands import train_config
    from training.loop import train

    _checkpoint(tmp_path / "last.pt", optimizer="sgd", epochs=33, lr=0.05, w_bank=0.5)
    args = argparse.Namespace(run_dir=tmp_path, resume=True, config=None, overrides=["epochs=40"])
    cfg = train_config(args)
    assert (cfg.optimizer, cfg.epochs, cfg.lr, cfg.w_bank) == ("sgd", 40, 0.05, 0.5)
    with pytest.raises(ValueError, match="was trained with optimizer=sgd: resume it with the same optimizer"):
        train(load_config(None, ["optimizer=adamw"]), tmp_path, resume=True)
    assert not (tmp_path / "config.json").exists()
