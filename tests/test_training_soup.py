"""training.soup: the uniform average of bundles, checked on tiny networks whose average is known."""

from __future__ import annotations

import pytest
import torch

from model.bundle import bundle_from_model
from model.mobilenet import ModelConfig, build_model
from training.soup import average_bundles

CONFIG = ModelConfig("mobilenet_v1", 0.25, 96, 32)


def bundle(seed: int, version: str):
    torch.manual_seed(seed)
    net = build_model(CONFIG)
    for m in net.modules():  # distinct batch-norm statistics too, so averaging them is tested
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(seed + 1)
    return bundle_from_model(net, CONFIG, {"model_version": version, "recipe": {"alpha": 0.25}})


def test_every_float_tensor_is_the_mean_and_counters_come_from_the_first():
    a, b, c = bundle(0, "a"), bundle(1, "b"), bundle(2, "c")
    soup = average_bundles([a, b, c])
    for key, tensor in soup.state_dict.items():
        if tensor.is_floating_point():
            expected = (a.state_dict[key] + b.state_dict[key] + c.state_dict[key]) / 3
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(tensor, a.state_dict[key])
    assert soup.config == CONFIG and soup.metadata["soup_of"] == ["a", "b", "c"]
    assert soup.metadata["recipe"] == {"alpha": 0.25}
    soup.build()  # loads strictly into the network


def test_a_soup_of_one_network_is_that_network():
    a = bundle(0, "a")
    soup = average_bundles([a, a])
    assert all(torch.equal(soup.state_dict[k], a.state_dict[k]) for k in a.state_dict)


def test_different_networks_are_refused():
    other_config = ModelConfig("mobilenet_v1", 0.5, 96, 32)
    other = bundle_from_model(build_model(other_config), other_config)
    with pytest.raises(ValueError, match="cannot average"):
        average_bundles([bundle(0, "a"), other])
    with pytest.raises(ValueError, match="at least two"):
        average_bundles([bundle(0, "a")])


def test_bundles_that_held_out_different_people_are_refused():
    """Their soup would be calibrated and judged on people one of them was trained on."""
    a, b = bundle(0, "a"), bundle(1, "b")
    a.metadata["recipe"] = {"pairs": "lfw/pairs_dev.txt", "val_folds": [7, 8]}
    b.metadata["recipe"] = {"pairs": "lfw/pairs_dev.txt", "val_folds": [1, 2]}
    with pytest.raises(ValueError, match="held out"):
        average_bundles([a, b])
    b.metadata["recipe"] = dict(a.metadata["recipe"])
    assert average_bundles([a, b]).metadata["recipe"] == a.metadata["recipe"]

