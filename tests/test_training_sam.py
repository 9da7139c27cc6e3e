"""training.sam on a quadratic whose answer is known by hand, and BatchNorm's statistics across the second pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.sam import SharpnessAware, batchnorm_statistics_kept

A = (torch.tensor([1.0, 4.0]), torch.tensor([[2.0, 0.5]]))  # f(w) = sum(a * w^2) / 2 over two tensors


def quadratic(params: list[nn.Parameter]) -> torch.Tensor:
    return sum((a * p**2).sum() / 2 for a, p in zip(A, params, strict=True))


def test_the_gradient_is_taken_at_the_ascended_point_and_the_weights_come_back():
    params = [nn.Parameter(torch.tensor([1.0, -1.0])), nn.Parameter(torch.tensor([[0.5, 2.0]]))]
    start = [p.detach().clone() for p in params]
    sam = SharpnessAware(params, rho=0.1)
    quadratic(params).backward()
    g = [a * w for a, w in zip(A, start, strict=True)]  # the gradient of f: a * w
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    sam.ascend()
    for p, w, x in zip(params, start, g, strict=True):
        assert torch.allclose(p.detach(), w + 0.1 * x / norm)
    for p in params:
        p.grad = None
    quadratic(params).backward()
    sam.descend()
    for p, w, a, x in zip(params, start, A, g, strict=True):
        assert torch.equal(p.detach(), w)  # back where it was, to the bit
        assert torch.allclose(p.grad, a * (w + 0.1 * x / norm))  # f's gradient at the moved point


def test_parameters_without_a_gradient_stay_put():
    used, unused = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([7.0]))
    sam = SharpnessAware([used, unused], rho=0.5)
    (used**2).sum().backward()
    sam.ascend()
    assert torch.allclose(used.detach(), torch.tensor([3.3, 4.4])) and unused.item() == 7.0
    sam.descend()
    assert torch.equal(used.detach(), torch.tensor([3.0, 4.0]))


def test_batchnorm_normalises_by_the_batch_but_keeps_its_statistics_in_the_second_pass():
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(16, 3) * 5 + 2
    bn(x)
    def statistics() -> list[torch.Tensor]:
        return [bn.running_mean, bn.running_var, bn.num_batches_tracked]

    kept = [b.clone() for b in statistics()]
    with batchnorm_statistics_kept(nn.Sequential(bn)):
        out = bn(x)
        assert not torch.equal(bn.running_mean, kept[0])  # (it did update them inside)
    assert all(torch.equal(b, k) for b, k in zip(statistics(), kept, strict=True))
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-5)  # still the batch's own normalisation
    with pytest.raises(RuntimeError), batchnorm_statistics_kept(bn):
        bn(torch.full((4, 3), float("inf")))  # a moved point gone wrong must not poison the statistics
        raise RuntimeError
    assert all(torch.equal(b, k) for b, k in zip(statistics(), kept, strict=True))
