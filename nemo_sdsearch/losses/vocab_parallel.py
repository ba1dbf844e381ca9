"""All vocab-parallel (tensor-parallel) math: token log-probs, distillation divergences, monitoring metrics.

Each tensor-parallel (TP) rank r of a group of size tp holds the logits of one vocabulary shard,
`logits[:, r*Vp:(r+1)*Vp]` of a padded vocabulary V_pad = Vp * tp (megatron pads the real vocabulary V
up to a multiple of `make_vocab_size_divisible_by * tp`, see `core.vocab.pad_vocab_size`). Columns with global id
>= V are TP padding: they are cut off before anything is computed, so they take no part in the softmax
normalisation nor in the loss, and their gradient is exactly zero. A rank may hold no real column at all.

The functions here return, on every rank of the group, the same full per-row values as the dense
functions on the gathered logits[:, :V]:

    vocab_parallel_logprobs           == log_softmax(x / T)[target]
    vocab_parallel_generalized_jsd    == divergences.generalized_jsd_dense (GKD/TRL convention: P = teacher,
                                         Q = student, beta = 0 forward KL(P||Q), beta = 1 reverse KL(Q||P))
    vocab_parallel_clipped_forward_kl == divergences.clipped_forward_kl_dense  (sum_v min(p_v log(p_v/q_v), tau))
    vocab_parallel_argmax             == x.argmax(-1)           (first index among ties, like torch)
    vocab_parallel_entropy            == -(softmax(x / T) * log_softmax(x / T)).sum(-1)

`token_logprobs` is the single-device case of `vocab_parallel_logprobs`: the same code on the full logits
[rows, V] with a group of one, which communicates nothing even inside an initialised process group (the
dense log-probs of the HF actor and of the single-device `losses.shard.VocabShard`).

The losses do not call these functions: they call the methods of a `losses.shard.VocabShard` (the TP group
passed explicitly by the actor, the real vocabulary size, the shard's columns), whose single-device instance
runs the dense implementations of divergences.py instead. The functions below are the same kernels for
callers that hold a group and a shard (tests, benchmarks); their `group=None` is WORLD when a process group
is initialised, else a group of one. No global state is consulted: a megatron actor passes its TP group.

Do NOT sum (or average) these values over the TP ranks: every TP rank holds the whole value, not a part of
it. Each rank computes its loss from them as if it were alone; backward is purely local and writes the
gradient of that loss into the local shard only (the gradient with respect to the other shards is produced
by the ranks that own them), exactly as megatron's `vocab_parallel_cross_entropy` does; megatron's TP
mappings (e.g. the output layer's `copy_to_tensor_model_parallel_region`) then all-reduce the gradient of
the replicated hidden states.

Communication, per chunk of `chunk_rows` rows (no other collective is issued, backward issues none; with a
group of size 1, or without an initialised process group, nothing is communicated at all):

    logprobs (the NeMo-Aligner DistributedLogprob pattern, 2 all-reduces):
      1. MAX over [rows]:    the local row maxima of the raw logits x                -> the global row max M
      2. SUM over [2, rows]: (sum_v exp(d_v) over local real columns,
                              d_target on the rank owning the target, 0 elsewhere),  d = (x - M) / T
      log p(target) = d_target - log S, S = sum_v exp(d_v). M and log S are kept apart for backward (never
      folded into one log-partition that would be subtracted from logits of its own size), which recomputes
      the softmax chunk by chunk: grad = (onehot - exp(d - log S)) / T.

    divergences (2 all-reduces, both SUM):
      1. statistics: SUM over [tp, 4, rows], zero except this rank's slot [rank] which holds
         (m_r = local max of the raw student logits, z_r = local sum exp((x - m_r) / T), the same two for the
         teacher) over the local real columns (m_r = -inf, z_r = 0 for a rank without real columns). It is
         an all-gather written as an all-reduce (portable to every backend, tp*4*rows numbers); each rank
         then combines the slots locally, exactly, with the raw max and the log-sum kept apart:
             M = max_r m_r,   log S = log(sum_r z_r exp((m_r - M) / T)),
             log_softmax(x / T) = (x - M) / T - log S      (x - M formed first, then divided by T),
         so nothing of the size of the logits is subtracted from a number of the same size (a log-partition
         M / T + log S subtracted from x / T would lose about eps * |x| / T of absolute precision).
         A MAX all-reduce followed by a SUM all-reduce of exp sums would be a second statistics all-reduce,
         and the JSD (0 < beta < 1) and clipped-KL partial sums depend non-linearly on both normalisers
         (through log m_v and the clip), so they could not be folded into it: that would be 3 all-reduces.
      2. row sums: SUM over [k, rows] of the local partial sums over the local real columns:
           beta = 0 (k=1):      sum_v p_v (t_v - s_v)                   = loss
           beta = 1 (k=1):      sum_v q_v (s_v - t_v)                   = loss
           0 < beta < 1 (k=2):  A = sum_v p_v (t_v - log m_v),  B = sum_v q_v (s_v - log m_v);
                                loss = beta A + (1 - beta) B
           clipped (k=2):       sum_v min(p_v (t_v - s_v), tau)         = loss,
                                U = sum_v p_v [p_v (t_v - s_v) < tau]
      with s = (x_s - M_s) / T - log S_s (the student's log-softmax), t likewise for the teacher,
      q = exp(s) = exp((x_s - m_r) / T) * exp((m_r - M_s) / T - log S_s) (the local exps of statistic 1
      reused), p likewise, m = beta p + (1 - beta) q (global normalisers from all-reduce 1).

    The gradient with respect to the local student shard is computed in the forward pass from the reduced
    row sums (the closed forms of divergences.py) and kept, in the student's dtype, for backward:
           beta = 0:            (q - p) / T
           beta = 1:            q (g - loss) / T,              g = s - t
           0 < beta < 1:        (1 - beta) q (g - B) / T,      g = s - log m
           clipped:             (q U - p [term < tau]) / T
    Backward multiplies it by the incoming per-row gradient in fp32 (fp64 for fp64) and rounds once to the
    student's dtype, chunk by chunk.

    metrics (argmax, entropy; under no_grad, detached results): 1 all-reduce each, SUM.
      argmax: [tp, 2, rows] fp64, an all-gather of each rank's (local max, global index of the local argmax);
      the first rank attaining the global max holds the first global index (ranks are in vocabulary order).
      entropy: [tp, 3, rows] of per-rank (m_r = max of the raw logits, and with d = (x - m_r) / T, the row
      max subtracted BEFORE dividing by T: z_r = sum exp(d), s_r = sum exp(d) d) over the real columns,
      combined locally relative to the global raw max M, so nothing of the size of the logits cancels:
          M = max_r m_r,  c_r = (m_r - M) / T,  Z = sum_r z_r exp(c_r),  S = sum_r (s_r + c_r z_r) exp(c_r),
          H = log Z - S / Z              (log-partition = M / T + log Z,  E_p[x / T] = M / T + S / Z)

Memory: rows are processed `chunk_rows` at a time; the fp32 (fp64 for fp64 inputs) temporaries are a few
buffers of chunk_rows x Vp, never all rows x vocab. The divergences keep one rows x Vp gradient buffer in the
student's dtype (as divergences.py does; `inplace_grad=True` reuses the student logits for it); the
log-probs keep only the per-row M and log S (backward recomputes the softmax from the saved logits).
Inputs are upcast to fp32 (bf16/fp16) or kept in fp64; outputs are fp32 (fp64 for fp64 inputs).

compile (`sd.compile`, the divergences only): a divergence chunk is three local phases around the two
all-reduces (`_div_stats`, `_div_partial_sums`, `_div_gradient`); with compile=True each is torch.compile'd
(divergences._chunk_kernel, as the dense chunks are) and the all-reduces stay eager between them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_sdsearch.losses.divergences import _chunk_kernel, _scale_grad


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def shard_logits(full_logits: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s vocabulary shard of `full_logits` [..., V_pad]: columns [rank*Vp, (rank+1)*Vp) with
    Vp = V_pad // tp, as a contiguous copy."""
    v_pad = full_logits.shape[-1]
    if tp < 1 or not 0 <= rank < tp or v_pad % tp:
        raise ValueError(f"cannot take shard {rank} of {tp} from a vocabulary of {v_pad} columns")
    vp = v_pad // tp
    return full_logits[..., rank * vp:(rank + 1) * vp].clone(memory_format=torch.contiguous_format)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def group_rank(group) -> tuple[int, int]:
    """(size, this process's rank) of a process group; a group of one for `None` (nothing communicated)."""
    if group is None:
        return 1, 0
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return tp, rank


def _resolve_group(group):
    """(group, tp, rank in group) for the functions below: the given group; for None, WORLD when a process
    group is initialised, else a group of one (None, nothing communicated). Nothing else is looked up: an
    actor whose TP group is not WORLD passes it (`losses.shard.VocabShard` carries it)."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return (group,) + group_rank(group)


def _layout(shard: torch.Tensor, tp: int, rank: int, vocab_size) -> tuple[int, int]:
    """(first global id of the shard, number of real, non-padding columns in the shard): rank r of tp holds
    columns [r * Vp, (r + 1) * Vp) of the padded vocabulary, Vp = the shard's width."""
    if vocab_size is None:
        raise ValueError("vocab_size (the real, unpadded vocabulary size) is required")
    vp = shard.shape[-1]
    if not 1 <= vocab_size <= vp * tp:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, Vp*tp = {vp}*{tp}]")
    lo = rank * vp
    return lo, max(0, min(vp, vocab_size - lo))


def _all_reduce(t: torch.Tensor, op, group, tp: int) -> torch.Tensor:
    if tp > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _shifted(x: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """(x - shift[:, None]) / T, a new tensor in x's dtype: the (raw) shift is subtracted BEFORE the division
    by T, so a large common offset of the logits costs no precision."""
    d = x - shift[:, None]
    return d.div_(temperature) if temperature != 1.0 else d


def _local_stats(x: torch.Tensor, temperature: float):
    """(raw row max m, exp((x - m) / T), sum of it) over the local real columns of the raw logits x;
    (-inf, None, 0) if there are none."""
    if x.shape[-1] == 0:
        n = x.shape[0]
        return (torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device), None,
                torch.zeros(n, dtype=x.dtype, device=x.device))
    m = x.amax(-1)
    e = _shifted(x, m, temperature).exp_()
    return m, e, e.sum(-1)


def _combine(m_all: torch.Tensor, z_all: torch.Tensor, temperature: float):
    """(global raw row max M, log S) from the per-rank slots [tp, rows] of (raw max m_r, sum exp((x - m_r) / T)):
    log S = log(sum_r z_r exp((m_r - M) / T)), so that log_softmax(x / T) = (x - M) / T - log S. A rank
    without real columns (m_r = -inf, z_r = 0) contributes 0."""
    mx = m_all.amax(0)
    return mx, torch.log((z_all * torch.exp((m_all - mx) / temperature)).sum(0))


# ---------------------------------------------------------------------------------------------------
# Log-probs of target tokens
# ---------------------------------------------------------------------------------------------------
class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_rows, group, tp, lo, nr):
        n = logits.shape[0]
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(n, dtype=cdt, device=logits.device)
        row_max = torch.empty(n, dtype=cdt, device=logits.device)   # raw global row max M
        log_sum = torch.empty(n, dtype=cdt, device=logits.device)   # log sum_v exp((x_v - M) / T)
        for i in range(0, n, chunk_rows):
            x = logits[i:i + chunk_rows, :nr].to(cdt)  # may alias the logits: never modified in place
            rows = x.shape[0]
            mx = x.amax(-1) if nr else torch.full((rows,), float("-inf"), dtype=cdt, device=x.device)
            mx = _all_reduce(mx.contiguous(), dist.ReduceOp.MAX, group, tp)
            packed = torch.zeros(2, rows, dtype=cdt, device=x.device)
            if nr:
                d = _shifted(x, mx, temperature)                # (x - M) / T
                local = targets[i:i + chunk_rows] - lo
                own = (local >= 0) & (local < nr)
                picked = d.gather(1, local.clamp(0, nr - 1)[:, None]).squeeze(1)
                packed[1] = torch.where(own, picked, torch.zeros_like(picked))
                packed[0] = d.exp_().sum(-1)
                del d
            _all_reduce(packed, dist.ReduceOp.SUM, group, tp)
            ls = torch.log(packed[0])
            out[i:i + chunk_rows] = packed[1] - ls
            row_max[i:i + chunk_rows] = mx
            log_sum[i:i + chunk_rows] = ls
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, row_max, log_sum)
            ctx.meta = (temperature, chunk_rows, lo, nr)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, row_max, log_sum = ctx.saved_tensors
        temperature, chunk_rows, lo, nr = ctx.meta
        grad = torch.zeros_like(logits)  # padding columns stay 0
        if nr:
            for i in range(0, logits.shape[0], chunk_rows):
                g = _shifted(logits[i:i + chunk_rows, :nr].to(row_max.dtype), row_max[i:i + chunk_rows],
                             temperature)
                g = g.sub_(log_sum[i:i + chunk_rows, None]).exp_().neg_()   # -softmax
                local = targets[i:i + chunk_rows] - lo
                own = (local >= 0) & (local < nr)
                idx = local.clamp(0, nr - 1)[:, None]
                g.scatter_add_(1, idx, own.to(g.dtype)[:, None])
                g.mul_(grad_out[i:i + chunk_rows, None].to(g.dtype) / temperature)
                grad[i:i + chunk_rows, :nr] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def logprobs_kernel(logits, targets, temperature, chunk_rows, group, tp, lo, nr) -> torch.Tensor:
    """log_softmax(x / T)[target] per row of the shard `logits` [rows, Vp] whose first column is global id
    `lo` and whose first `nr` columns are real (the rest TP padding), over the group of `tp` ranks."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [rows, Vp] and targets [rows]; got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _VocabParallelLogprob.apply(logits, targets.long(), float(temperature), int(chunk_rows),
                                       group, tp, lo, nr)


def vocab_parallel_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, group=None, vocab_size=None,
                            temperature: float = 1.0, chunk_rows: int = 1024) -> torch.Tensor:
    """log_softmax(logits / T)[target] per row from vocab-sharded logits [rows, Vp] and global target ids
    [rows] (each < vocab_size). Returns [rows] (fp32, fp64 for fp64 logits), the same full value on every
    rank of `group`: do not sum it over TP ranks. Backward is local: (onehot - softmax) / T into this shard.

    group: default megatron's TP group when initialised, else WORLD. vocab_size: the real vocabulary size
    (required; columns at or beyond it are TP padding and are ignored)."""
    group, tp, rank = _resolve_group(group)
    return logprobs_kernel(logits_shard, targets, temperature, chunk_rows, group, tp,
                           *_layout(logits_shard, tp, rank, vocab_size))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: int = 1024) -> torch.Tensor:
    """log_softmax(logits / T)[target] per row from the full logits [rows, V] on one device, in fp32 (fp64
    for fp64 logits): `vocab_parallel_logprobs` with a group of one, so nothing is communicated even inside
    an initialised process group. d = (logits - row max) / T with the raw row max subtracted before dividing
    by T and never added back, so a large common offset of the logits costs no precision; rows are processed
    `chunk_rows` at a time, and backward recomputes the softmax from the logits."""
    return logprobs_kernel(logits, targets, temperature, chunk_rows, None, 1, 0, logits.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Divergences
# ---------------------------------------------------------------------------------------------------
def _div_stats(xs, xt, temperature):
    """Phase 1 of a divergence chunk (local, before all-reduce 1): `_local_stats` of the student and the teacher
    over the local real columns (at least one)."""
    ms, es, zs = _local_stats(xs, temperature)    # es = exp((xs - ms) / T)
    mt, et, zt = _local_stats(xt, temperature)
    return ms, es, zs, mt, et, zt


def _div_partial_sums(xs, xt, ms, es, mt, et, max_s, log_ss, max_t, log_st, kind, param, temperature):
    """Phase 2 (between the all-reduces): the per-row partial sums [k, rows] over the local real columns and the
    pieces of the student gradient, (q or None, g). `es` and `et` are reused in place (they become q and p)."""
    s = _shifted(xs, max_s, temperature).sub_(log_ss[:, None])   # log q = (xs - M) / T - log S
    t = _shifted(xt, max_t, temperature).sub_(log_st[:, None])   # log p
    # q = exp((xs - ms) / T) * exp((ms - M) / T - log S): the local exps reused, no second exp pass
    q = es.mul_(torch.exp((ms - max_s) / temperature - log_ss)[:, None])
    p = et.mul_(torch.exp((mt - max_t) / temperature - log_st)[:, None])
    if kind == "clipped":
        terms = p * (t - s)
        del s, t
        unclipped = terms < param
        loss = terms.clamp_(max=param).sum(-1)
        del terms
        g = p.mul_(unclipped)                      # p [term < tau]
        return torch.stack([loss, g.sum(-1)]), q, g
    if param == 0.0:                               # forward KL(P || Q)
        loss = (p * (t - s)).sum(-1)
        return loss[None], None, q.sub_(p)         # gradient complete: q - p
    if param == 1.0:                               # reverse KL(Q || P)
        g = s.sub_(t)                              # log q - log p
        return (q * g).sum(-1)[None], q, g
    log_m = torch.log(torch.clamp(param * p + (1 - param) * q, min=torch.finfo(p.dtype).tiny))
    a = (p * (t - log_m)).sum(-1)
    g = s.sub_(log_m)                              # log q - log m
    del log_m, t
    return torch.stack([a, (q * g).sum(-1)]), q, g


def _div_gradient(q, g, parts, kind, param, temperature):
    """Phase 3 (after all-reduce 2): the gradient of the row losses with respect to the local student shard,
    from the reduced row sums `parts` (closed forms in the module docstring)."""
    if kind == "clipped":
        g = q.mul_(parts[1][:, None]).sub_(g)      # q U - p [term < tau]
    elif param == 1.0:
        g = q.mul_(g.sub_(parts[0][:, None]))      # q (g - loss)
    elif param != 0.0:
        g = q.mul_(g.sub_(parts[1][:, None])).mul_(1 - param)  # (1 - b) q (g - B)
    if temperature != 1.0:
        g = g.div_(temperature)
    return g


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, kind, param, temperature, chunk_rows, group, tp, rank, nr, inplace_grad,
                compile):
        need_grad = ctx.needs_input_grad[0]
        n = student.shape[0]
        cdt = _compute_dtype(student.dtype)
        dev = student.device
        mid = kind == "jsd" and 0.0 < param < 1.0
        k = 2 if kind == "clipped" or mid else 1
        # compile: the three local phases of a chunk each torch.compile'd (divergences._chunk_kernel; the
        # all-reduces between them stay eager)
        stats_fn = _chunk_kernel(_div_stats, compile)
        sums_fn = _chunk_kernel(_div_partial_sums, compile)
        grad_fn = _chunk_kernel(_div_gradient, compile)
        losses = torch.empty(n, dtype=cdt, device=dev)
        grad = None
        if need_grad:
            grad = student.detach() if inplace_grad else torch.empty_like(student)
            grad[:, nr:] = 0  # TP padding: no gradient
        for i in range(0, n, chunk_rows):
            xs = student[i:i + chunk_rows, :nr].to(cdt)  # raw logits; may alias the inputs: read only
            xt = teacher[i:i + chunk_rows, :nr].to(cdt)
            rows = xs.shape[0]
            if nr:
                ms, es, zs, mt, et, zt = stats_fn(xs, xt, temperature)
            else:  # no real column here: (-inf, None, 0)
                ms, es, zs = _local_stats(xs, temperature)
                mt, et, zt = _local_stats(xt, temperature)
            # all-reduce 1 (SUM): the per-rank (raw max, sum exp((x - max) / T)) slots of student and teacher.
            stats = torch.zeros(tp, 4, rows, dtype=cdt, device=dev)
            stats[rank] = torch.stack([ms, zs, mt, zt])
            _all_reduce(stats, dist.ReduceOp.SUM, group, tp)
            max_s, log_ss = _combine(stats[:, 0], stats[:, 1], temperature)
            max_t, log_st = _combine(stats[:, 2], stats[:, 3], temperature)
            del stats
            if nr:
                parts, q, g = sums_fn(xs, xt, ms, es, mt, et, max_s, log_ss, max_t, log_st, kind, param,
                                      temperature)
                del xs, xt, es, et
            else:
                parts = torch.zeros(k, rows, dtype=cdt, device=dev)
            # all-reduce 2 (SUM): the per-row partial sums over the local real columns.
            _all_reduce(parts, dist.ReduceOp.SUM, group, tp)
            losses[i:i + chunk_rows] = param * parts[0] + (1 - param) * parts[1] if mid else parts[0]
            if need_grad and nr:
                grad[i:i + chunk_rows, :nr] = grad_fn(q, g, parts, kind, param, temperature).to(grad.dtype)
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (_scale_grad(grad, grad_losses, ctx.chunk_rows),) + (None,) * 11


def divergence_kernel(student, teacher, kind: str, param: float, temperature: float, chunk_rows: int, group,
                      tp: int, rank: int, nr: int, inplace_grad: bool = False, compile: bool = False):
    """Per-row generalized JSD (kind "jsd", param = beta) or clipped forward KL (kind "clipped", param = tau)
    of the shards [rows, Vp] whose first `nr` columns are real, rank `rank` of a group of `tp`. compile: each
    chunk's local computations torch.compile'd (as `sd.compile` does for divergences.py's chunks)."""
    _check_pair(student, teacher, chunk_rows, param if kind == "jsd" else None)
    return _VocabParallelDivergence.apply(student, teacher.detach(), kind, float(param), float(temperature),
                                          int(chunk_rows), group, tp, rank, nr, bool(inplace_grad), bool(compile))


def _check_pair(student, teacher, chunk_rows, beta=None):
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher logit shards must both be [rows, Vp]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if beta is not None and not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD mixture weight beta must be in [0, 1], got {beta}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def vocab_parallel_generalized_jsd(student_shard: torch.Tensor, teacher_shard: torch.Tensor, group=None,
                                   vocab_size=None, beta: float = 0.5, temperature: float = 1.0,
                                   chunk_rows: int = 256, inplace_grad: bool = False) -> torch.Tensor:
    """Per-row generalized JSD from vocab-sharded student/teacher logits [rows, Vp]; equals
    `divergences.generalized_jsd_dense` on the gathered logits[:, :vocab_size]. Returns [rows] (fp32, fp64
    for fp64 inputs), the same full value on every rank of `group`: do not sum it over TP ranks. The teacher
    is under stop-gradient; backward is local and writes into the student shard only.

    inplace_grad=True overwrites `student_shard` with its gradient during forward (see divergences.py)."""
    group, tp, rank = _resolve_group(group)
    _, nr = _layout(student_shard, tp, rank, vocab_size)
    return divergence_kernel(student_shard, teacher_shard, "jsd", beta, temperature, chunk_rows, group, tp, rank,
                             nr, inplace_grad)


def vocab_parallel_clipped_forward_kl(student_shard: torch.Tensor, teacher_shard: torch.Tensor, group=None,
                                      vocab_size=None, tau: float = 10.0, temperature: float = 1.0,
                                      chunk_rows: int = 256, inplace_grad: bool = False) -> torch.Tensor:
    """Per-row pointwise-clipped forward KL sum_v min(p_v log(p_v / q_v), tau) from vocab-sharded logits;
    equals `divergences.clipped_forward_kl_dense` on the gathered logits[:, :vocab_size]. The clip applies
    to each vocabulary term (with the global softmax normalisers). Same conventions as
    `vocab_parallel_generalized_jsd`."""
    group, tp, rank = _resolve_group(group)
    _, nr = _layout(student_shard, tp, rank, vocab_size)
    return divergence_kernel(student_shard, teacher_shard, "clipped", tau, temperature, chunk_rows, group, tp,
                             rank, nr, inplace_grad)


# ---------------------------------------------------------------------------------------------------
# Monitoring metrics (no gradient): argmax and entropy per row
# ---------------------------------------------------------------------------------------------------
def _check_shard(shard: torch.Tensor, chunk_rows: int) -> None:
    if shard.dim() != 2:
        raise ValueError(f"logits must be [rows, Vp]; got {tuple(shard.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


@torch.no_grad()
def argmax_kernel(logits_shard: torch.Tensor, group, tp: int, rank: int, lo: int, nr: int) -> torch.Tensor:
    """Global argmax ids [rows] of the shard whose first column is global id `lo` and whose first `nr` columns
    are real, rank `rank` of a group of `tp` (ranks in vocabulary order)."""
    _check_shard(logits_shard, 1)
    n = logits_shard.shape[0]
    slots = torch.zeros(tp, 2, n, dtype=torch.float64, device=logits_shard.device)
    if nr:
        mx, idx = logits_shard[:, :nr].max(-1)
        slots[rank, 0] = mx.double()
        slots[rank, 1] = (idx + lo).double()
    else:
        slots[rank, 0] = float("-inf")
    _all_reduce(slots, dist.ReduceOp.SUM, group, tp)
    best = slots[:, 0].amax(0)
    # ranks are in vocabulary order: the first rank attaining the maximum holds the first global index
    first = (slots[:, 0] == best).to(torch.int64).argmax(0)
    return slots[:, 1].gather(0, first[None]).squeeze(0).long()


def vocab_parallel_argmax(logits_shard: torch.Tensor, group=None, vocab_size=None) -> torch.Tensor:
    """Global argmax ids [rows] (long) of vocab-sharded logits [rows, Vp], the same on every rank of
    `group`; among equal maxima the smallest global id wins (as `torch.argmax` on the gathered logits).
    A row whose real logits are all NaN gives an unspecified id."""
    group, tp, rank = _resolve_group(group)
    return argmax_kernel(logits_shard, group, tp, rank, *_layout(logits_shard, tp, rank, vocab_size))


@torch.no_grad()
def entropy_kernel(logits_shard: torch.Tensor, temperature: float, chunk_rows: int, group, tp: int, rank: int,
                   nr: int) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row of the shard whose first `nr` columns are real, rank `rank` of
    a group of `tp`."""
    _check_shard(logits_shard, chunk_rows)
    n = logits_shard.shape[0]
    cdt = _compute_dtype(logits_shard.dtype)
    out = torch.empty(n, dtype=cdt, device=logits_shard.device)
    for i in range(0, n, chunk_rows):
        x = logits_shard[i:i + chunk_rows, :nr].to(cdt)   # raw logits (may alias: read only)
        rows = x.shape[0]
        slots = torch.zeros(tp, 3, rows, dtype=cdt, device=x.device)
        if nr:
            m = x.amax(-1)
            d = x - m[:, None]                            # shifted by the raw local max, then divided by T
            if temperature != 1.0:
                d = d.div_(temperature)
            e = torch.exp(d)
            slots[rank, 0] = m
            slots[rank, 1] = e.sum(-1)
            # no cancellation against M below; exp(-inf) * -inf would be NaN: entries with zero probability
            # contribute nothing
            slots[rank, 2] = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(-1)
        else:
            slots[rank, 0] = float("-inf")
        _all_reduce(slots, dist.ReduceOp.SUM, group, tp)
        m_all = slots[:, 0]
        mx = m_all.amax(0)
        real = torch.isfinite(m_all)   # a rank without real columns reports -inf
        shift = torch.where(real, (m_all - mx) / temperature, torch.zeros_like(m_all))   # c_r
        w = torch.where(real, torch.exp(shift), torch.zeros_like(m_all))
        z = (slots[:, 1] * w).sum(0)
        s = ((slots[:, 2] + shift * slots[:, 1]) * w).sum(0)   # sum_v exp((x_v - M) / T) (x_v - M) / T
        out[i:i + chunk_rows] = torch.log(z) - s / z
    return out


def vocab_parallel_entropy(logits_shard: torch.Tensor, group=None, vocab_size=None, temperature: float = 1.0,
                           chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row [rows] (fp32, fp64 for fp64 logits) from vocab-sharded
    logits [rows, Vp], the same full value on every rank of `group` (do not sum it over TP ranks).
    Memory: one chunk_rows x Vp buffer in the compute dtype at a time."""
    group, tp, rank = _resolve_group(group)
    _, nr = _layout(logits_shard, tp, rank, vocab_size)
    return entropy_kernel(logits_shard, temperature, chunk_rows, group, tp, rank, nr)


__all__ = [
    "argmax_kernel",
    "divergence_kernel",
    "entropy_kernel",
    "group_rank",
    "logprobs_kernel",
    "shard_logits",
    "token_logprobs",
    "vocab_parallel_argmax",
    "vocab_parallel_clipped_forward_kl",
    "vocab_parallel_entropy",
    "vocab_parallel_generalized_jsd",
    "vocab_parallel_logprobs",
]
