"""A uniform "model soup" (Wortsman et al. 2022): the average of several fine-tunes of one network.

Fine-tunes that start from the same weights stay in one basin, so their average is a network of its own that
often scores better than each of them. Every floating-point tensor is averaged, batch-norm running statistics
included; integer counters are taken from the first bundle. The result still needs its scoring cohort and
thresholds (``training.loop.calibrate_bundle``; ``visage soup`` does both).
"""

from __future__ import annotations

from model.bundle import Bundle

# what decides which people a bundle never saw: its thresholds are judged on them, so every ingredient must agree
HELD_OUT_KEYS = ("prepared", "pairs", "pairs_namespace", "val_folds")


def average_bundles(bundles: list[Bundle]) -> Bundle:
    """The uniform average of ``bundles`` (same config, same tensors); metadata says what went in."""
    if len(bundles) < 2:
        raise ValueError("a soup needs at least two bundles")
    first = bundles[0]
    mine = _held_out(first)
    for other in bundles[1:]:
        if other.config != first.config:
            raise ValueError(f"cannot average {other.config} with {first.config}")
        if other.state_dict.keys() != first.state_dict.keys():
            raise ValueError("the bundles hold different tensors")
        theirs = _held_out(other)
        if mine != theirs:
            raise ValueError(f"{other.source or other.model_version} held out {theirs}, {first.source or 'the first'} "
                             f"{mine}: a soup of them would be calibrated on people one of them was trained on")
    state = {}
    for key, tensor in first.state_dict.items():
        if tensor.is_floating_point():
            state[key] = sum(b.state_dict[key].double() for b in bundles).div(len(bundles)).to(tensor.dtype)
        else:
            state[key] = tensor.clone()
    metadata = {"recipe": first.metadata.get("recipe"),
                "soup": [str(b.source or b.model_version) for b in bundles],
                "soup_of": [b.model_version for b in bundles],
                "views": first.metadata.get("views")}  # calibrated with the first one's views unless told
    return Bundle(first.config, state, {k: v for k, v in metadata.items() if v is not None})


def _held_out(bundle: Bundle) -> dict[str, object]:
    recipe = bundle.metadata.get("recipe") or {}
    return {k: recipe.get(k) for k in HELD_OUT_KEYS}
