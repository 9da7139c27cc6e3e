"""model.bundle: weights + config + metadata in one file; loading rebuilds the network or says why not."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

from model.bundle import FORMAT, Bundle, bundle_from_model, load_bundle, save_bundle
from model.errors import InvalidConfig, WeightsError
from model.mobilenet import ModelConfig, build_model
from model.preprocess import crops_to_tensor
from training.paths import shared_data

METADATA = {
    "model_version": "mobilenet_v1-a0.5-r112-d128-test",
    "thresholds": {"1e-3": 0.4213, "1e-4": 0.5377},
    "validation": {"accuracy": 0.9512, "folds": [7, 8]},
    "recipe": {"miner": "batch_hard", "epochs": 3},
}


def lfw_crops(n: int = 4) -> np.ndarray:
    """Real face pixels: the centre 112x112 of LFW's 160x160 crops."""
    folder = shared_data() / "lfw" / "images" / "Colin_Powell"
    files = sorted(folder.iterdir())[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB"))[24:136, 24:136] for f in files])


def calibrated_net(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random network whose batch-norm statistics come from real faces, so its outputs vary with the
    input."""
    torch.manual_seed(seed)
    net = build_model(config)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(crops_to_tensor(lfw_crops(8), config.resolution))
    return net.eval()


@pytest.fixture(scope="module")
def net_and_path(tmp_path_factory):
    config = ModelConfig()
    net = calibrated_net(config)
    path = save_bundle(bundle_from_model(net, config, METADATA), tmp_path_factory.mktemp("bundle") / "b.pt")
    return net, path


def test_round_trip_gives_identical_outputs(net_and_path):
    net, path = net_and_path
    bundle = load_bundle(path)
    x = crops_to_tensor(lfw_crops(), 112)
    with torch.no_grad():
        expected, got = net(x), bundle.build()(x)
    assert torch.equal(expected, got)
    assert not bundle.build().training
    # and the outputs are not trivially equal: different faces give different vectors
    assert (expected[0] @ expected[1]).item() < 0.99


def test_config_and_metadata_travel_with_the_weights(net_and_path):
    _, path = net_and_path
    bundle = load_bundle(str(path))
    assert bundle.config == ModelConfig()
    assert bundle.metadata == METADATA
    assert bundle.model_version == METADATA["model_version"]
    assert bundle.thresholds == {"1e-3": 0.4213, "1e-4": 0.5377}
    assert bundle.threshold() == 0.4213  # the default operating point is FAR 1e-3
    assert bundle.threshold("1e-4") == 0.5377
    assert bundle.threshold("0.0001") == bundle.threshold("1E-4 ") == 0.5377  # however the number is written
    assert bundle.calibrated_far("0.001") == "1e-3" and bundle.calibrated_far("abc") is None
    assert bundle.calibrated_far("0.00_1") is None  # (float() reads it as 0.001: model.numbers does not)
    with pytest.raises(ValueError, match="calibrated for FAR 1e-3, 1e-4, not '1e-6'"):
        bundle.threshold("1e-6")  # an operating point it was never calibrated for is an error, not a guess


def test_digest_names_the_exact_weights(net_and_path):
    net, path = net_and_path
    bundle = load_bundle(path)
    assert bundle.weights_digest() == bundle_from_model(net, ModelConfig()).weights_digest()
    changed = {k: v.clone() for k, v in bundle.state_dict.items()}
    key = next(k for k in changed if k.endswith("weight"))
    changed[key].view(-1)[0] += 1e-3
    assert Bundle(bundle.config, changed).weights_digest() != bundle.weights_digest()
    unnamed = Bundle(bundle.config, bundle.state_dict)  # no metadata: the version is derived from the digest
    assert unnamed.model_version == f"mobilenet_v1-{bundle.weights_digest()[:12]}"


def test_other_configs_round_trip(tmp_path):
    config = ModelConfig("mobilenet_v1", 0.25, 64, 32)
    net = calibrated_net(config, seed=1)
    bundle = load_bundle(save_bundle(bundle_from_model(net, config), tmp_path / "sub" / "small.pt"))
    assert bundle.config == config
    x = crops_to_tensor(lfw_crops(2), 64)
    with torch.no_grad():
        assert torch.equal(net(x), bundle.build()(x))


def test_save_is_atomic_and_overwrites(net_and_path, tmp_path):
    net, _ = net_and_path
    path = tmp_path / "w.pt"
    path.write_bytes(b"old contents")
    save_bundle(bundle_from_model(net, ModelConfig(), {"model_version": "v2"}), path)
    assert load_bundle(path).model_version == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temp file left behind
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):  # was a rename error, and a 4 MB temp file left
        save_bundle(bundle_from_model(net, ModelConfig()), tmp_path / "folder.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pt", "w.pt"]


def test_a_write_that_fails_is_an_oserror_naming_the_file_and_leaves_nothing(net_and_path, tmp_path, monkeypatch):
    """torch.save raised RuntimeError ("enforce fail at inline_container.cc: ... Permission denied") for a folder
    it may not write or a full disk: a traceback, where every caller handles OSError. A file where a folder
    should be said only "File exists"."""
    import builtins

    bundle = bundle_from_model(net_and_path[0], ModelConfig())
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"cannot write {tmp_path}/notes.txt/w.pt: {tmp_path}/notes.txt "
                       "is a file, not a folder"):
        save_bundle(bundle, tmp_path / "notes.txt" / "w.pt")
    if Path("/sys").is_dir():  # read-only even for root (who can write a chmod 555 folder)
        with pytest.raises(PermissionError, match="^cannot write /sys/visage-test.pt: Permission denied$"):
            save_bundle(bundle, "/sys/visage-test.pt")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **kw: real_open("/dev/full" if str(path).endswith(
        ".pt.tmp") else path, *a, **kw))  # a full disk: torch.save's RuntimeError over the OSError
    with pytest.raises(OSError, match=f"^cannot write {tmp_path}/w.pt: No space left on device$"):
        save_bundle(bundle, tmp_path / "w.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_missing_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_bundle(tmp_path / "nope.pt")


def test_random_bytes_are_a_weights_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError):
        load_bundle(path)


def test_a_photo_given_as_weights_is_named_as_not_a_bundle(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo("obama.jpg").read_bytes())
    with pytest.raises(WeightsError, match="not a Visage weights bundle") as err:
        load_bundle(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)  # none of torch's advice


def test_truncated_bundle_is_a_weights_error(net_and_path, tmp_path):
    _, good = net_and_path
    path = tmp_path / "cut.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError):
        load_bundle(path)


def test_a_plain_state_dict_is_not_a_bundle(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_model(ModelConfig()).state_dict(), path)
    with pytest.raises(WeightsError, match="not a Visage weights bundle"):
        load_bundle(path)


def test_an_unknown_format_version_is_refused(net_and_path, tmp_path):
    _, good = net_and_path
    payload = torch.load(good, weights_only=True)
    assert payload["format"] == FORMAT
    payload["format"] = "visage-bundle/999"
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(WeightsError, match="not a Visage weights bundle"):
        load_bundle(tmp_path / "future.pt")


class _Sneaky:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"format": FORMAT, "x": _Sneaky(marker)}, fh, protocol=2)
    torch.save(
        {"format": FORMAT, "config": {}, "metadata": {}, "state_dict": _Sneaky(marker)}, tmp_path / "evil2.pt"
    )
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(WeightsError):
            load_bundle(p)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config_fail_at_build(tmp_path):
    other = build_model(ModelConfig(alpha=0.25))
    bundle = Bundle(ModelConfig(alpha=0.5), {k: v.clone() for k, v in other.state_dict().items()})
    with pytest.raises(WeightsError, match="do not fit"):
        load_bundle(save_bundle(bundle, tmp_path / "mismatch.pt")).build()
    state = build_model(ModelConfig()).state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(WeightsError):
        Bundle(ModelConfig(), state).build()


def test_weights_that_do_not_fit_say_so_in_one_line_naming_the_file(tmp_path):
    """A bundle whose config says alpha 0.25 over alpha 0.5 tensors: torch's message lists every tensor (23 KB,
    a hundred lines, printed whole by `visage compare --weights`); one line naming the file is enough."""
    other = build_model(ModelConfig(alpha=0.5))
    path = save_bundle(Bundle(ModelConfig(alpha=0.25), {k: v.clone() for k, v in other.state_dict().items()}),
                       tmp_path / "mismatch.pt")
    with pytest.raises(WeightsError) as info:
        load_bundle(path).build()
    detail = info.value.detail
    assert "\n" not in detail and len(detail) < 600, detail
    assert str(path) in detail and "do not fit" in detail and "size mismatch" in detail and "more)" in detail


def test_a_folder_given_as_weights_is_named_as_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is a folder"):
        load_bundle(tmp_path)


def test_an_unreadable_bundle_is_not_called_another_kind_of_file(net_and_path, monkeypatch):
    """A bundle without read permission was "not a Visage weights bundle (torch.load: PermissionError; a damaged
    bundle, or another kind of file)". (Patched: the tests may run as root, whom chmod 000 does not stop.)"""
    _, good = net_and_path

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(WeightsError) as info:
        load_bundle(good)
    assert info.value.detail == f"cannot read the weights file {good}: Permission denied"


def test_an_invalid_stored_config_is_refused(net_and_path, tmp_path):
    _, good = net_and_path
    payload = torch.load(good, weights_only=True)
    payload["config"]["alpha"] = 2.0
    torch.save(payload, tmp_path / "bad_alpha.pt")
    with pytest.raises(InvalidConfig):
        load_bundle(tmp_path / "bad_alpha.pt")


@pytest.mark.parametrize("damage", ["unknown config key", "no config", "no state_dict"])
def test_a_malformed_bundle_of_the_right_format_is_a_weights_error(net_and_path, tmp_path, damage):
    """A file that says it is a bundle but lacks parts must still fail as WeightsError (the CLI and the API
    map VisageError to a clear message), not as a bare TypeError / KeyError traceback."""
    _, good = net_and_path
    payload = torch.load(good, weights_only=True)
    if damage == "unknown config key":
        payload["config"]["width"] = 3
    elif damage == "no config":
        del payload["config"]
    else:
        del payload["state_dict"]
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = tmp_path / "malformed.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError):
        load_bundle(path)


def test_a_training_checkpoint_given_as_weights_says_how_to_make_a_bundle(tmp_path):
    """`export --weights runs/r1/last.pt` said only "not a Visage weights bundle (expected format ...)"."""
    path = tmp_path / "r1" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": {}, "opt": {}, "sched": {}, "epoch": 0, "history": [], "config": {}}, path)
    with pytest.raises(WeightsError, match=r"is a training checkpoint.*visage train --run-dir .*r1 --export"):
        load_bundle(path)


def test_weights_changed_under_their_model_version_are_refused(tmp_path):
    """A bundle whose weights were changed but kept the old version string was served against the index and the
    stored embeddings of the old weights, silently (a face against its own enrolled photo: 0.454, not 0.469)."""
    bundle = load_bundle()
    changed = {k: v.clone() for k, v in bundle.state_dict.items()}
    first = next(k for k, v in changed.items() if v.is_floating_point())
    changed[first] += 1e-3
    path = tmp_path / "changed.pt"
    save_bundle(Bundle(bundle.config, changed, dict(bundle.metadata), score_norm=bundle.score_norm), path)
    with pytest.raises(WeightsError, match="are not the ones its model version .* names"):
        load_bundle(path)
    assert load_bundle(path, check_version=False).model_version == bundle.model_version  # calibrate renames it
