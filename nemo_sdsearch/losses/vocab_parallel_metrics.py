"""Monitoring metrics on vocab-sharded logits (no gradient): argmax and entropy per row.

The logits of a tensor-parallel (TP) output layer are split over the vocabulary: rank r holds columns
[r*Vp, (r+1)*Vp) of the padded vocabulary, columns with global id >= vocab_size are padding (see
`losses.vocab_parallel`, whose conventions these helpers follow: same group resolution, padding cut off
before anything is computed, the same full value returned on every rank of the group).

    vocab_parallel_argmax(shard)   == logits[:, :V].argmax(-1)   (first index among ties, like torch)
    vocab_parallel_entropy(shard)  == -(softmax(x) * log_softmax(x)).sum(-1),  x = logits[:, :V] / T

Communication: one all-reduce each. The argmax all-reduces a [tp, 2, rows] fp64 tensor (every rank writes
its (local max, global index of the local argmax) into its own slot, i.e. an all-gather written as a SUM
all-reduce, portable to every backend); the entropy all-reduces a [tp, 3, rows] tensor of per-rank
(m_r = max of the raw logits, and with d = (logits - m_r) / T, the row max subtracted BEFORE dividing by T:
z_r = sum exp(d), s_r = sum exp(d) d) over its real columns and combines the slots locally (everything
relative to the global raw max M, so nothing of the size of the logits cancels):

    M = max_r m_r,   c_r = (m_r - M) / T,   Z = sum_r z_r exp(c_r),   S = sum_r (s_r + c_r z_r) exp(c_r),
    H = log Z - S / Z              (log-partition = M / T + log Z,  E_p[x / T] = M / T + S / Z)

Both are for metrics only: they run under no_grad and return detached tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_sdsearch.losses.vocab_parallel import _all_reduce, _compute_dtype, _layout, _resolve_group


def _check(shard: torch.Tensor, chunk_rows: int) -> None:
    if shard.dim() != 2:
        raise ValueError(f"logits must be [rows, Vp]; got {tuple(shard.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


@torch.no_grad()
def vocab_parallel_argmax(logits_shard: torch.Tensor, group=None, vocab_size=None) -> torch.Tensor:
    """Global argmax ids [rows] (long) of vocab-sharded logits [rows, Vp], the same on every rank of
    `group`; among equal maxima the smallest global id wins (as `torch.argmax` on the gathered logits).
    A row whose real logits are all NaN gives an unspecified id."""
    _check(logits_shard, 1)
    group, tp, rank = _resolve_group(group)
    lo, nr = _layout(logits_shard, tp, rank, vocab_size)
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


@torch.no_grad()
def vocab_parallel_entropy(logits_shard: torch.Tensor, group=None, vocab_size=None, temperature: float = 1.0,
                           chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row [rows] (fp32, fp64 for fp64 logits) from vocab-sharded
    logits [rows, Vp], the same full value on every rank of `group` (do not sum it over TP ranks).
    Memory: one chunk_rows x Vp buffer in the compute dtype at a time."""
    _check(logits_shard, chunk_rows)
    group, tp, rank = _resolve_group(group)
    _, nr = _layout(logits_shard, tp, rank, vocab_size)
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


__all__ = ["vocab_parallel_argmax", "vocab_parallel_entropy"]
