"""Distillation from the dense model: ``η·KL(P_teacher ‖ P_student) + (1 − η)·CE``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distill_loss"]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    eta: float = 1 / 3,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """CAST's training loss: ``eta · KL(teacher ‖ student) + (1 − eta) · CE(student, labels)``.

    Args:
        student_logits: ``[..., V]`` logits of the model being trained.
        teacher_logits: ``[..., V]`` logits of the frozen dense model (no gradient flows into it).
        labels: ``[...]`` class indices aligned with the logits (for a causal LM, shift them
            yourself: ``logits[:, :-1]`` with ``labels[:, 1:]``). Positions equal to
            ``ignore_index`` are left out of both terms.
        eta: weight of the KL term (default 1/3, the paper's).
        temperature: softmax temperature of the KL term; the KL is multiplied by T² so its
            gradient scale does not depend on T (Hinton et al.). The CE term uses T = 1.
        ignore_index: label value to ignore (default -100, as ``F.cross_entropy``).

    Returns the scalar loss; both terms are averaged over the tokens that are not ignored. With
    no such token the loss is a zero that still carries a graph (so ``backward`` works).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(student_logits.shape[:-1])} (the logits without the class dim), got {tuple(labels.shape)}"
        )
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    y = labels.reshape(-1)
    valid = y != ignore_index
    if torch.compiler.is_compiling():
        return _masked_loss(s, t, y, valid, eta, temperature, ignore_index)
    if not bool(valid.any()):
        return s.sum() * 0.0
    s, t, y = s[valid], t[valid], y[valid]
    ce = F.cross_entropy(s.float(), y)
    log_p_student = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2
    return eta * kl + (1.0 - eta) * ce


def _masked_loss(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, eta: float, temperature: float, ignore_index: int
) -> torch.Tensor:
    """The same loss with the ignored tokens masked instead of selected: no data-dependent
    branch or shape, so ``torch.compile(fullgraph=True)`` traces it. Used while compiling; eager
    calls keep the selecting form, whose sums (and so every published figure) it would change
    by rounding only."""
    count = valid.sum().clamp(min=1).to(torch.float32)
    ce = F.cross_entropy(s.float(), y, ignore_index=ignore_index, reduction="sum") / count
    log_p_student = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t.float() / temperature, dim=-1)
    kl_tok = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    kl = torch.where(valid, kl_tok, torch.zeros_like(kl_tok)).sum() / count * temperature**2
    return eta * kl + (1.0 - eta) * ce
