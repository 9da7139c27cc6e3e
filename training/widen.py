"""Function-preserving widening of a MobileNet v1 face embedder (Net2WiderNet, Chen et al. 2016).

Training a wider student from scratch costs many CPU hours; widening a trained one starts it exactly where
the narrow one ended. Each new channel copies an existing one (its depthwise filter, pointwise row and BN
statistics) and the next layer divides the weights it reads from every copy by the number of copies, so the
wide network computes the same embedding. A little noise on the copies' incoming weights breaks the symmetry
that would otherwise keep copies identical through training.
"""

from __future__ import annotations

import torch

from model.mobilenet import MOBILENET_V1_LAYERS, ModelConfig, scaled_channels

_BN = ("weight", "bias", "running_mean", "running_var")


def channel_map(old: int, new: int, gen: torch.Generator) -> torch.Tensor:
    """For each of ``new`` channels, the old channel it copies: the first ``old`` are themselves."""
    if new < old:
        raise ValueError(f"cannot widen {old} channels to {new}")
    extra = torch.randint(0, old, (new - old,), generator=gen)
    return torch.cat([torch.arange(old), extra])


def _copy_bn(state: dict, out: dict, prefix: str, mapping: torch.Tensor) -> None:
    for name in _BN:
        out[f"{prefix}.{name}"] = state[f"{prefix}.{name}"][mapping].clone()
    out[f"{prefix}.num_batches_tracked"] = state[f"{prefix}.num_batches_tracked"].clone()


def _fan_in_share(mapping: torch.Tensor) -> torch.Tensor:
    """1 / (number of copies of each input channel's original): what each copy contributes downstream."""
    counts = torch.bincount(mapping)
    return 1.0 / counts[mapping].to(torch.float32)


def _noisy(weight: torch.Tensor, old: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Perturb the output rows of the copies (rows ``old`` onwards) by ``noise`` x the layer's weight std."""
    if noise > 0 and weight.shape[0] > old:
        scale = noise * float(weight[:old].std())
        weight[old:] += scale * torch.randn(weight[old:].shape, generator=gen)
    return weight


def widen_state_dict(
    state: dict[str, torch.Tensor], old: ModelConfig, new: ModelConfig, noise: float = 0.01, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``state`` of a ``build_model(old)`` network rewritten for ``build_model(new)``; ``new.alpha >= old.alpha``.

    The input size is not part of the weights, so ``new.resolution`` may differ (a fine-tune at another size).
    """
    if old.backbone != "mobilenet_v1" or new.backbone != "mobilenet_v1":
        raise ValueError("widening is defined for mobilenet_v1 only")
    if new.embedding_dim != old.embedding_dim:
        raise ValueError(f"embedding size differs: {old.embedding_dim} vs {new.embedding_dim}")
    if new.alpha < old.alpha:
        raise ValueError(f"cannot narrow alpha {old.alpha} to {new.alpha}")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    prev = torch.arange(3)  # RGB input: not widened
    for i, (kind, _, channels) in enumerate(MOBILENET_V1_LAYERS):
        n_old = scaled_channels(channels, old.alpha)
        mapping = channel_map(n_old, scaled_channels(channels, new.alpha), gen)
        full = f"body.features.{i}"  # the standard conv's ConvBNReLU, or the block's pointwise one
        if kind != "conv":
            dw, full = f"body.features.{i}.depthwise", f"body.features.{i}.pointwise"
            out[f"{dw}.0.weight"] = state[f"{dw}.0.weight"][prev].clone()  # per channel: copies copy their filter
            _copy_bn(state, out, f"{dw}.1", prev)
        w = state[f"{full}.0.weight"][mapping][:, prev] * _fan_in_share(prev).view(1, -1, 1, 1)
        out[f"{full}.0.weight"] = _noisy(w, n_old, noise, gen)
        _copy_bn(state, out, f"{full}.1", mapping)
        prev = mapping
    out["head.0.weight"] = state["head.0.weight"][:, prev] * _fan_in_share(prev).view(1, -1)
    _copy_bn(state, out, "head.1", torch.arange(new.embedding_dim))  # the embedding itself is not widened
    return out
