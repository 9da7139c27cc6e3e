"""training.losses: the triplet hinge, the distillation losses and the proxy margin softmax, on vectors whose answer
is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from training.losses import (
    bank_distillation_loss,
    distillation_loss,
    proxy_margin_loss,
    similarity_distillation_loss,
    teacher_proxies,
    triplet_margin_loss,
)


def idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_triplet_loss_on_hand_made_triplets():
    # e0 = x axis, e1 = y axis, e2 = -x axis: d(0,1) = sqrt(2), d(0,2) = 2
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss, active = triplet_margin_loss(emb, (idx(0), idx(1), idx(2)), margin=0.2)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and active == 0.0  # sqrt(2) - 2 + 0.2 < 0
    loss, active = triplet_margin_loss(emb, (idx(0), idx(2), idx(1)), margin=0.2)
    assert loss.item() == pytest.approx(2 - math.sqrt(2) + 0.2, abs=1e-5) and active == 1.0
    loss, active = triplet_margin_loss(emb, (idx(0, 0), idx(1, 2), idx(2, 1)), margin=0.2)
    assert loss.item() == pytest.approx(
        (2 - math.sqrt(2) + 0.2) / 2, abs=1e-5
    )  # mean over all triplets given
    assert active == 0.5


def test_triplet_loss_margin_and_gradient_direction():
    angles = torch.tensor([0.0, 0.5, 0.3])  # anchor, positive, negative (radians)
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1).requires_grad_(True)
    loss, _ = triplet_margin_loss(emb, (idx(0), idx(1), idx(2)), margin=0.5)
    d_ap, d_an = 2 * math.sin(0.25), 2 * math.sin(0.15)
    assert loss.item() == pytest.approx(d_ap - d_an + 0.5, abs=1e-5)
    loss.backward()
    step = emb.detach() - 0.01 * emb.grad
    after, _ = triplet_margin_loss(F.normalize(step, dim=1), (idx(0), idx(1), idx(2)), margin=0.5)
    assert after.item() < loss.item()  # a gradient step pulls the positive in and pushes the negative out


def test_triplet_loss_with_no_triplets_is_zero_and_differentiable():
    emb = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    empty = idx()
    loss, active = triplet_margin_loss(emb, (empty, empty, empty))
    assert loss.item() == 0.0 and active == 0.0
    loss.backward()
    assert emb.grad is not None and (emb.grad == 0).all()


@pytest.mark.parametrize("teacher_norm", [0.5, 1.0, 1.18, 1.71, 10.0])
def test_distillation_is_zero_for_the_same_direction_whatever_the_teacher_norm(teacher_norm):
    student = F.normalize(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    loss = distillation_loss(student, teacher_norm * student)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("teacher_norm", [0.5, 1.0, 1.71])
def test_distillation_is_four_for_opposite_directions(teacher_norm):
    student = F.normalize(torch.randn(5, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    assert distillation_loss(student, -teacher_norm * student).item() == pytest.approx(4.0, abs=1e-5)


def test_distillation_is_two_minus_two_cosine():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[3.0, 3.0], [0.0, -0.2]])  # 45 degrees off, then opposite
    expected = ((2 - 2 * math.cos(math.pi / 4)) + 4.0) / 2
    assert distillation_loss(student, teacher).item() == pytest.approx(expected, abs=1e-5)


def test_similarity_distillation_ignores_a_rotation_of_the_student_space_which_regression_does_not():
    teacher = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    student = F.normalize(teacher, dim=1) @ rotation
    assert similarity_distillation_loss(student, 3.0 * teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student, teacher).item() > 0.5


def test_similarity_distillation_is_the_mean_squared_cosine_error_over_pairs():
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # cosines: (1,2) 1, (1,3) 0, (2,3) 0
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # cosines: (1,2) 0, (1,3) 0, (2,3) 1
    assert similarity_distillation_loss(student, teacher).item() == pytest.approx((1 + 0 + 1) / 3, abs=1e-6)


def test_similarity_distillation_step_moves_each_pair_towards_the_teachers_similarity():
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(8, 32, generator=gen)
    student = F.normalize(torch.randn(8, 32, generator=gen), dim=1).requires_grad_(True)
    loss = similarity_distillation_loss(student, teacher)
    loss.backward()
    moved = F.normalize(student.detach() - 2.0 * student.grad, dim=1)
    t = F.normalize(teacher, dim=1)
    off = ~torch.eye(8, dtype=torch.bool)
    before = ((student.detach() @ student.detach().T - t @ t.T)[off]).abs().mean()
    after = ((moved @ moved.T - t @ t.T)[off]).abs().mean()
    assert similarity_distillation_loss(moved, teacher).item() < loss.item() and after < before


@pytest.mark.parametrize("n", [0, 1])
def test_similarity_distillation_of_fewer_than_two_faces_is_zero_and_differentiable(n):
    student = F.normalize(torch.randn(n, 8), dim=1).requires_grad_(True)
    loss = similarity_distillation_loss(student, torch.randn(n, 8))
    assert loss.item() == 0.0
    loss.backward()


def unit_angles(*angles: float) -> torch.Tensor:
    a = torch.tensor(angles)
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_bank_distillation_is_zero_when_the_student_points_where_the_teacher_does_whatever_its_norm():
    bank = unit_angles(0.0, 1.0, 2.5, -2.0)
    teacher = 1.7 * unit_angles(0.3, -1.2)
    loss = bank_distillation_loss(F.normalize(teacher, dim=1), teacher, bank, temperature=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_bank_distillation_is_the_kl_between_the_two_softmaxes_over_the_bank():
    bank = unit_angles(0.0, math.pi / 2)  # two bank faces at right angles
    student, teacher = unit_angles(math.pi / 2), unit_angles(0.0)  # the student sits on the other face
    tau = 0.5
    p = torch.softmax(torch.tensor([1.0, 0.0]) / tau, 0)  # teacher's cosines to the bank: 1, 0
    q = torch.softmax(torch.tensor([0.0, 1.0]) / tau, 0)  # student's: 0, 1
    expected = float((p * (p / q).log()).sum())
    assert bank_distillation_loss(student, teacher, bank, tau).item() == pytest.approx(expected, rel=1e-5)


def test_bank_distillation_step_pushes_the_student_off_an_impostor_the_teacher_puts_far():
    bank = unit_angles(0.0, 1.2)  # the face's own person, and an impostor
    teacher = unit_angles(0.1)
    raw = unit_angles(0.9).requires_grad_()  # the student leans towards the impostor
    bank_distillation_loss(F.normalize(raw, dim=1), teacher, bank, 0.1).backward()
    with torch.no_grad():
        moved = F.normalize(raw - 0.05 * raw.grad, dim=1)
    before, after = F.normalize(raw.detach(), dim=1) @ bank.T, moved @ bank.T
    assert after[0, 1] < before[0, 1] and after[0, 0] > before[0, 0]


def test_bank_distillation_of_no_faces_is_zero_and_differentiable():
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = bank_distillation_loss(empty, torch.zeros(0, 2), unit_angles(0.0, 1.0))
    loss.backward()
    assert loss.item() == 0.0


def test_teacher_proxies_are_each_identitys_mean_direction_whatever_the_descriptor_norms():
    descriptors = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.1]])
    proxies = teacher_proxies(descriptors, idx(0, 0, 1, 1), classes=2)
    # identity 0: the unit x and y axes average to the diagonal; identity 1: z, however long
    assert torch.allclose(proxies, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], [0.0, 0.0, 1.0]]))


def test_teacher_proxies_refuse_an_identity_without_a_direction():
    with pytest.raises(ValueError, match="every identity"):
        teacher_proxies(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), idx(0, 0, 1), classes=2)
    with pytest.raises(ValueError, match="every identity"):  # identity 2 has no descriptor at all
        teacher_proxies(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), idx(0, 1), classes=3)


def test_proxy_margin_loss_is_cosface_cross_entropy():
    proxies = torch.eye(3)
    emb = F.normalize(torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.1, 0.95]]), dim=1)
    labels = idx(0, 1)  # the second face points at identity 2's proxy, not its own
    cos = emb @ proxies.T
    expected = torch.stack([
        -torch.log_softmax(10 * torch.tensor([cos[0, 0] - 0.3, cos[0, 1], cos[0, 2]]), 0)[0],
        -torch.log_softmax(10 * torch.tensor([cos[1, 0], cos[1, 1] - 0.3, cos[1, 2]]), 0)[1],
    ]).mean()
    assert proxy_margin_loss(emb, labels, proxies, scale=10, margin=0.3).item() == pytest.approx(expected.item(),
                                                                                                  rel=1e-5)


def test_proxy_margin_loss_rewards_the_own_proxy_and_the_margin_asks_for_more():
    proxies = torch.eye(4)
    own = proxies[idx(0, 1, 2)]
    wrong = proxies[idx(1, 2, 3)]
    labels = idx(0, 1, 2)
    assert proxy_margin_loss(own, labels, proxies, 30, 0.2) < 0.01
    assert proxy_margin_loss(wrong, labels, proxies, 30, 0.2) > 30  # cos 1 to a stranger, 0 to oneself
    assert proxy_margin_loss(own, labels, proxies, 30, 0.0) < proxy_margin_loss(own, labels, proxies, 30, 0.5)


def test_proxy_margin_loss_step_turns_a_face_towards_its_own_proxy():
    proxies = torch.eye(3)
    emb = F.normalize(torch.tensor([[0.5, 0.8, 0.1]]), dim=1).requires_grad_(True)
    loss = proxy_margin_loss(emb, idx(0), proxies)
    loss.backward()
    step = F.normalize(emb.detach() - 0.01 * emb.grad, dim=1)
    assert step[0, 0] > emb[0, 0] and step[0, 1] < emb[0, 1]  # towards identity 0, away from identity 1
    assert proxy_margin_loss(step, idx(0), proxies) < loss


def test_proxy_margin_loss_of_no_faces_is_zero_and_differentiable():
    emb = torch.zeros(0, 3, requires_grad=True)
    loss = proxy_margin_loss(emb, idx(), torch.eye(3))
    loss.backward()
    assert loss.item() == 0.0
