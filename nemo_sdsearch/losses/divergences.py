"""Token-level distillation divergences between a teacher and a student, row by row.

Convention (GKD / TRL): P = teacher, Q = student, both `softmax(logits / temperature)`;
mixture M = b*P + (1-b)*Q and

    JSD_b(P || Q) = b * KL(P || M) + (1 - b) * KL(Q || M),

with the ends taken as TRL does: b = 0 is the forward KL(P || Q), b = 1 the reverse KL(Q || P).
The Search-E1 loss is the pointwise-clipped forward KL, sum_v min(P_v log(P_v / Q_v), tau).

The teacher is always under stop-gradient. Each divergence has a dense form (plain autograd, the
reference) and a chunked form: a custom autograd function that walks `chunk_rows` rows at a time,
computes the loss and its gradient with respect to the student logits in one pass (closed form below),
and keeps that gradient (in the student's dtype) for backward, so at most one chunk of rows x vocab is ever
held in fp32. Backward multiplies it by the incoming per-row gradient in fp32, chunk by chunk, and rounds
once to the student's dtype. The chunks compute log-softmax as (x - max) / T - log(sum), the row max
subtracted before the division and never added back, so large logits (or a large common offset) cost no
precision.

Gradients with respect to the student logits s (q = softmax(s / T)), for g_v = dL/dq_v:
    dL/ds_v = (1/T) * q_v * (g_v - sum_u q_u g_u)
    JSD_b:        g_v = (1 - b) * log(q_v / m_v)          (0 < b < 1)
    forward KL:   dL/ds = (q - p) / T
    reverse KL:   g_v = log(q_v / p_v)
    clipped KL:   g_v = -p_v / q_v where the term is below tau, 0 where it is clipped
"""

from __future__ import annotations


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
def _softmax_parts(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, probs) of softmax(logits / T) with a single exp: with d = (logits - max) / T (the raw row max
    subtracted BEFORE dividing by T, so a large common offset costs no precision) and e = exp(d),
    probs = e / sum(e) and log-probs = d - log(sum(e)) (max and log-sum kept apart)."""
    x = _f32(logits)
    x = x - x.amax(-1, keepdim=True)
    if temperature != 1.0:
        x = x / temperature
    e = torch.exp(x)
    z = e.sum(-1, keepdim=True)
    return x - torch.log(z), e / z


def _jsd_chunk(s_logits, t_logits, beta, temperature, need_grad):
    s, q = _softmax_parts(s_logits, temperature)
    t, p = _softmax_parts(t_logits, temperature)
    if beta == 0.0:
        loss = (p * (t - s)).sum(-1)
        return loss, ((q - p) / temperature if need_grad else None)
    if beta == 1.0:
        g = s - t
        loss = (q * g).sum(-1)
    else:
        # The mixture in probability space: one log per element. Clamping at the smallest normal number
        # only touches entries where both p and q underflowed; their terms are p*(.) = q*(.) = 0.
        log_m = torch.log(torch.clamp(beta * p + (1 - beta) * q, min=torch.finfo(p.dtype).tiny))
        g = s - log_m
        loss = beta * (p * (t - log_m)).sum(-1) + (1 - beta) * (q * g).sum(-1)
        g = (1 - beta) * g
    if not need_grad:
        return loss, None
    grad = q * (g - (q * g).sum(-1, keepdim=True))
    return loss, (grad / temperature if temperature != 1.0 else grad)


def _clipped_chunk(s_logits, t_logits, tau, temperature, need_grad):
    s, q = _softmax_parts(s_logits, temperature)
    t, p = _softmax_parts(t_logits, temperature)
    terms = p * (t - s)
    unclipped = terms < tau
    loss = torch.where(unclipped, terms, torch.full_like(terms, tau)).sum(-1)
    if not need_grad:
        return loss, None
    pu = p * unclipped
    return loss, (q * pu.sum(-1, keepdim=True) - pu) / temperature


def _scale_grad(grad: torch.Tensor, grad_rows: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """grad * grad_rows[:, None], the product formed in fp32 (fp64 for fp64 operands) and rounded once to
    grad's dtype (a bf16 product of bf16 operands would round three times), `chunk_rows` rows at a time so no
    rows x vocab buffer in the compute dtype is allocated. `grad` itself is left intact."""
    cdt = torch.promote_types(torch.promote_types(grad.dtype, grad_rows.dtype), torch.float32)
    if grad.dtype == cdt and grad_rows.dtype == cdt:
        return grad * grad_rows[:, None]
    out = torch.empty_like(grad)
    w = grad_rows.to(cdt)
    for i in range(0, grad.shape[0], chunk_rows):
        out[i:i + chunk_rows] = grad[i:i + chunk_rows].to(cdt) * w[i:i + chunk_rows, None]
    return out


_COMPILED: dict = {}


def _chunk_kernel(fn, compile: bool):
    """The eager chunk function, or its torch.compile'd version (one fused loop per chunk: inductor's
    C++ backend on CPU, Triton on GPU). Compiling costs tens of seconds once per process and shape."""
    if not compile:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk_fn, param, temperature, chunk_rows, inplace_grad):
        need_grad = student_logits.requires_grad
        n = student_logits.shape[0]
        losses = torch.empty(n, dtype=_f32(student_logits[:0]).dtype, device=student_logits.device)
        # inplace_grad: the gradient overwrites the student logits chunk by chunk once each chunk's loss
        # is computed (as Liger-Kernel does), so no second rows x vocab buffer is allocated. The version
        # counter is bumped, so autograd raises if anything else saved these logits for its backward.
        if need_grad:
            grad = student_logits.detach() if inplace_grad else torch.empty_like(student_logits)
        else:
            grad = None
        for i in range(0, n, chunk_rows):
            loss, g = chunk_fn(student_logits[i:i + chunk_rows], teacher_logits[i:i + chunk_rows],
                               param, temperature, need_grad)
            losses[i:i + chunk_rows] = loss
            if need_grad:
                grad[i:i + chunk_rows] = g.to(grad.dtype)
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return _scale_grad(grad, grad_losses, ctx.chunk_rows), None, None, None, None, None, None


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0, chunk_rows: int = 64, inplace_grad: bool = False,
                    compile: bool = False) -> torch.Tensor:
    """Per-row generalized JSD (chunked; same values and gradients as `generalized_jsd_dense`).

    inplace_grad=True overwrites `student_logits` with its gradient during forward: use it only on a
    tensor nothing else reads afterwards (e.g. the rows gathered for this loss)."""
    _check(student_logits, teacher_logits, beta)
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), _chunk_kernel(_jsd_chunk, compile),
                                    float(beta), float(temperature), int(chunk_rows), bool(inplace_grad))


def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 10.0,
                       temperature: float = 1.0, chunk_rows: int = 64, inplace_grad: bool = False,
                       compile: bool = False) -> torch.Tensor:
    """Per-row pointwise-clipped forward KL (chunked; same as `clipped_forward_kl_dense`)."""
    _check(student_logits, teacher_logits)
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(),
                                    _chunk_kernel(_clipped_chunk, compile), float(tau), float(temperature),
                                    int(chunk_rows), bool(inplace_grad))
