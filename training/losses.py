"""Losses on L2-normalised embeddings: the triplet margin loss over mined triplets, distillation (per sample, in
the batch, and against a bank of every training face), and a margin softmax over proxies taken from the teacher."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from training.miners import Triplets, pairwise_distances


def triplet_margin_loss(emb: torch.Tensor, triplets: Triplets, margin: float = 0.2) -> tuple[torch.Tensor, float]:
    """Mean hinge ``max(0, d(a,p) - d(a,n) + margin)`` over the triplets, and the fraction still active.

    Averaging over all triplets given (active or not) keeps batch-hard's scale; batch-all callers already pass
    only active triplets, which is the usual "average over non-zero" variant.
    """
    a, p, n = triplets
    if len(a) == 0:
        return emb.sum() * 0.0, 0.0
    d = pairwise_distances(emb)
    hinge = F.relu(d[a, p] - d[a, n] + margin)
    return hinge.mean(), float((hinge > 0).float().mean())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error between the student's unit vector and the teacher's, normalised to unit length.

    For unit vectors ``|s - t|^2 = 2 - 2 cos(s, t)``: regression that matches the teacher by angle, which
    is what verification compares, and ignores its descriptor norms (1.18-1.71 for dlib).
    """
    t = F.normalize(teacher, dim=1)
    return (student - t).pow(2).sum(1).mean()


def similarity_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error between the batch's cosine-similarity matrices, student's against teacher's (off-diagonal).

    Verification compares faces with each other, never with the teacher: this term asks the student for the
    teacher's similarity between every pair of faces in the batch (two people, or a face and a blend of it), and is
    blind to any rotation of the student's space, which per-sample regression is not. ``student`` is unit length.
    """
    n = len(student)
    if n < 2:
        return student.sum() * 0.0
    t = F.normalize(teacher, dim=1)
    diff = student @ student.T - t @ t.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    return diff[off_diagonal].pow(2).mean()


def bank_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor,
                           temperature: float = 0.05) -> torch.Tensor:
    """KL from the teacher's softmax over its cosines to a bank of training faces to the student's softmax over
    its own cosines to the same bank (CompRess, Abbasi Koohpayegani et al. 2020), averaged over the batch.

    A low-FAR threshold is decided by the few impostors a face scores high against. Per-sample regression does
    not see them and the in-batch relation term sees 127 faces; this compares each face with the whole bank (the
    teacher's descriptors of every training face), so a student that places a face near the wrong people is
    pushed off them, most where the teacher is most sure. ``student`` is unit length, ``bank`` unit rows.
    """
    if len(student) == 0:
        return student.sum() * 0.0
    t = F.normalize(teacher, dim=1)
    log_p_teacher = F.log_softmax(t @ bank.T / temperature, dim=1)
    log_p_student = F.log_softmax(student @ bank.T / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def teacher_proxies(descriptors: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """One unit vector per identity: the mean direction of its (centred) teacher descriptors, (classes, dim).

    The student is taught to point where the teacher points, so the teacher's identity centroids are proxies the
    student can be scored against from the first step: no learned class weights, which P x K batches (32 of
    4,000+ identities a step) would update a dozen times in a whole run.
    """
    unit = F.normalize(descriptors.float(), dim=1)
    sums = unit.new_zeros(classes, unit.shape[1]).index_add_(0, labels.to(unit.device), unit)
    if bool((sums.norm(dim=1) == 0).any()):
        raise ValueError("every identity needs at least one teacher descriptor with a direction")
    return F.normalize(sums, dim=1)


def proxy_margin_loss(emb: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, scale: float = 30.0,
                      margin: float = 0.2) -> torch.Tensor:
    """CosFace (Wang et al. 2018) against fixed proxies: softmax over ``scale * cos`` to every identity's proxy,
    with the true identity's cosine lowered by ``margin``.

    Each face is compared with all training identities at once, not just the 32 in its batch as in the triplet
    term: it must be nearer its own proxy than any other person's by the margin.
    """
    if len(emb) == 0:
        return emb.sum() * 0.0
    logits = emb @ proxies.T
    logits = logits - margin * F.one_hot(labels, proxies.shape[0]).to(logits.dtype)
    return F.cross_entropy(scale * logits, labels)
