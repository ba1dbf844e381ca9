"""Token-level distillation divergences between a teacher and a student, row by row.

Convention (GKD / TRL): P = teacher, Q = student, both `softmax(logits / temperature)`;
mixture M = b*P + (1-b)*Q and

    JSD_b(P || Q) = b * KL(P || M) + (1 - b) * KL(Q || M),

with the ends taken as TRL does: b = 0 is the forward KL(P || Q), b = 1 the reverse KL(Q || P).
The Search-E1 loss is the pointwise-clipped forward KL, sum_v min(P_v log(P_v / Q_v), tau).

The teacher is always under stop-gradient. Each divergence has a dense form (plain autograd, the
reference) and a chunked form: a custom autograd function that walks `chunk_rows` rows at a time,
computes the loss and its gradient with respect to the student logits in one pass (closed form below),
and keeps that gradient for backward, so at most one chunk of rows x vocab is ever held in fp32.

Gradients with respect to the student logits s (q = softmax(s / T)), for g_v = dL/dq_v:
    dL/ds_v = (1/T) * q_v * (g_v - sum_u q_u g_u)
    JSD_b:        g_v = (1 - b) * log(q_v / m_v)          (0 < b < 1)
    forward KL:   dL/ds = (q - p) / T
    reverse KL:   g_v = log(q_v / p_v)
    clipped KL:   g_v = -p_v / q_v where the term is below tau, 0 where it is clipped
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for reference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check(student: torch.Tensor, teacher: torch.Tensor, beta: float | None = None) -> None:
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher logits must both be [rows, vocab]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if beta is not None and not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD mixture weight beta must be in [0, 1], got {beta}")


# ---------------------------------------------------------------------------------------------------
# Dense references
# ---------------------------------------------------------------------------------------------------
def generalized_jsd_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                          temperature: float = 1.0) -> torch.Tensor:
    """Per-row generalized JSD, plain autograd (the TRL/GKD formulation). Returns [rows]."""
    _check(student_logits, teacher_logits, beta)
    s = F.log_softmax(_f32(student_logits) / temperature, -1)
    t = F.log_softmax(_f32(teacher_logits.detach()) / temperature, -1)
    if beta == 0.0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1.0:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    kl_t = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def clipped_forward_kl_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 10.0,
                             temperature: float = 1.0) -> torch.Tensor:
    """Per-row sum_v min(p_v log(p_v / q_v), tau), plain autograd. Returns [rows]."""
    _check(student_logits, teacher_logits)
    s = F.log_softmax(_f32(student_logits) / temperature, -1)
    t = F.log_softmax(_f32(teacher_logits.detach()) / temperature, -1)
    terms = t.exp() * (t - s)
    return torch.clamp(terms, max=tau).sum(-1)


# ---------------------------------------------------------------------------------------------------
# Chunked forms
# ---------------------------------------------------------------------------------------------------
def _jsd_chunk(s_logits, t_logits, beta, temperature, need_grad):
    s = F.log_softmax(_f32(s_logits) / temperature, -1)
    t = F.log_softmax(_f32(t_logits) / temperature, -1)
    q = s.exp()
    if beta == 0.0:
        p = t.exp()
        loss = (p * (t - s)).sum(-1)
        grad = (q - p) / temperature if need_grad else None
        return loss, grad
    if beta == 1.0:
        loss = (q * (s - t)).sum(-1)
        if not need_grad:
            return loss, None
        g = s - t
    else:
        # log m = logsumexp(log b + t, log(1-b) + s), computed without a stacked copy.
        lb, l1b = math.log(beta), math.log1p(-beta)
        a, c = t + lb, s + l1b
        hi = torch.maximum(a, c)
        m = hi + torch.log(torch.exp(a - hi) + torch.exp(c - hi))
        p = t.exp()
        loss = beta * (p * (t - m)).sum(-1) + (1 - beta) * (q * (s - m)).sum(-1)
        if not need_grad:
            return loss, None
        g = (1 - beta) * (s - m)
    grad = q * (g - (q * g).sum(-1, keepdim=True)) / temperature
    return loss, grad


def _clipped_chunk(s_logits, t_logits, tau, temperature, need_grad):
    s = F.log_softmax(_f32(s_logits) / temperature, -1)
    t = F.log_softmax(_f32(t_logits) / temperature, -1)
    p = t.exp()
    terms = p * (t - s)
    unclipped = terms < tau
    loss = torch.where(unclipped, terms, torch.full_like(terms, tau)).sum(-1)
    if not need_grad:
        return loss, None
    pu = p * unclipped
    grad = (s.exp() * pu.sum(-1, keepdim=True) - pu) / temperature
    return loss, grad


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk_fn, param, temperature, chunk_rows):
        need_grad = student_logits.requires_grad
        n = student_logits.shape[0]
        losses = torch.empty(n, dtype=_f32(student_logits[:0]).dtype, device=student_logits.device)
        grad = torch.empty_like(student_logits) if need_grad else None
        for i in range(0, n, chunk_rows):
            loss, g = chunk_fn(student_logits[i:i + chunk_rows], teacher_logits[i:i + chunk_rows],
                               param, temperature, need_grad)
            losses[i:i + chunk_rows] = loss
            if need_grad:
                grad[i:i + chunk_rows] = g.to(grad.dtype)
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None, None


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0, chunk_rows: int = 256) -> torch.Tensor:
    """Per-row generalized JSD (chunked; same values and gradients as `generalized_jsd_dense`)."""
    _check(student_logits, teacher_logits, beta)
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), _jsd_chunk, float(beta),
                                    float(temperature), int(chunk_rows))


def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 10.0,
                       temperature: float = 1.0, chunk_rows: int = 256) -> torch.Tensor:
    """Per-row pointwise-clipped forward KL (chunked; same as `clipped_forward_kl_dense`)."""
    _check(student_logits, teacher_logits)
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), _clipped_chunk, float(tau),
                                    float(temperature), int(chunk_rows))
