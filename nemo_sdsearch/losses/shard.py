"""`VocabShard`: where a loss's logits sit in the vocabulary, and the vocabulary math on them.

The losses never ask which backend made their logits. They hold a `VocabShard` and call its methods:

    shard.logprobs(logits, targets, T)            log_softmax(x / T)[target] per row (differentiable)
    shard.entropy(logits, T)                      entropy of softmax(x / T) per row (no grad)
    shard.argmax(logits)                          argmax id per row (no grad)
    shard.jsd(student, teacher, beta, T, ...)     generalized JSD(teacher || student) per row (GKD / TRL)
    shard.clipped_forward_kl(student, teacher, tau, ...)   sum_v min(p_v log(p_v / q_v), tau) per row
    shard.sum_over_shards(t)                      SUM of a tensor over the shards (in place; e.g. squared norms)

Every per-row value is the full value (over the whole real vocabulary) on every rank of the group: do not sum
it over the shards. Gradients go into the given logits only.

Two kinds, one interface:

- `VocabShard(vocab_size, start, end, group)`: the logits are columns [start, end) of the padded vocabulary
  (megatron's column-parallel LM head: rank r of tp holds [r * Vp, (r + 1) * Vp)), over the tensor-parallel
  process `group`, which the actor passes (`MegatronActor.vocab_shard`; group None: one process, nothing
  communicated). Columns with global id >= vocab_size are TP padding: cut off before anything is computed
  (no share of the softmax, exactly zero gradient). The math is losses/vocab_parallel.py's.
- `VocabShard.single(vocab_size=None)`: all the logits on one device (the HF actor, a megatron actor that
  gathers its logits). Its methods are the dense implementations (divergences.py's chunked divergences,
  `token_logprobs`, torch's log-softmax / argmax) on the real columns: the first `vocab_size` (None: all).

Both honour `compile` (`sd.compile`): the dense chunks or the vocab-parallel chunks' local phases are
torch.compile'd (divergences._chunk_kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_sdsearch.losses.divergences import clipped_forward_kl, generalized_jsd
from nemo_sdsearch.losses.vocab_parallel import (argmax_kernel, divergence_kernel, entropy_kernel, group_rank,
                                                 logprobs_kernel, token_logprobs)

# Row chunks when the caller names none (the defaults the two kinds had before they shared one interface).
DENSE_DIVERGENCE_CHUNK = 64
PARALLEL_DIVERGENCE_CHUNK = 256
METRIC_CHUNK = 1024


@dataclass(frozen=True)
class VocabShard:
    """Columns [start, end) of the padded vocabulary of `vocab_size` real ids, held by this rank of the
    tensor-parallel process `group` (None: one process). See the module docstring."""
    vocab_size: int | None = None
    start: int = 0
    end: int | None = None
    group: Any = None

    def __post_init__(self):
        if self.vocab_size is None or self.end is None:
            raise ValueError("a vocabulary shard needs vocab_size and its columns [start, end); "
                             "VocabShard.single() is the single-device vocabulary")
        if not (self.vocab_size >= 1 and 0 <= self.start < self.end):
            raise ValueError(f"bad vocabulary shard: vocab_size={self.vocab_size}, columns [{self.start}, "
                             f"{self.end})")

    @classmethod
    def single(cls, vocab_size: int | None = None) -> "VocabShard":
        """All the logits on one device; `vocab_size`: the real ids (the first columns; None: every column)."""
        return SingleDeviceVocab(vocab_size)

    @classmethod
    def of_rank(cls, group, vocab_size: int, padded_vocab_size: int) -> "VocabShard":
        """This rank's shard of a padded vocabulary split evenly over `group` in rank order (megatron's)."""
        tp, rank = group_rank(group)
        if padded_vocab_size % tp or padded_vocab_size < vocab_size:
            raise ValueError(f"a padded vocabulary of {padded_vocab_size} does not split over {tp} ranks "
                             f"for {vocab_size} real ids")
        size = padded_vocab_size // tp
        return cls(vocab_size, rank * size, (rank + 1) * size, group)

    # -- layout -----------------------------------------------------------------------------------------
    def _layout(self, logits: torch.Tensor) -> tuple[int, int, int]:
        """(tp, rank, real columns of `logits`), checked against the shard's columns."""
        width = self.end - self.start
        if logits.dim() != 2 or logits.shape[-1] != width:
            raise ValueError(f"logits {tuple(logits.shape)} are not [rows, {width}]: the shard holds columns "
                             f"[{self.start}, {self.end})")
        tp, rank = group_rank(self.group)
        if self.start != rank * width or self.vocab_size > tp * width:
            raise ValueError(f"columns [{self.start}, {self.end}) of a vocabulary of {self.vocab_size} are not "
                             f"rank {rank}'s shard of {tp}")
        return tp, rank, max(0, min(width, self.vocab_size - self.start))

    # -- the operations ------------------------------------------------------------------------------------
    def logprobs(self, logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 chunk_rows: int = METRIC_CHUNK) -> torch.Tensor:
        """log_softmax(logits / T)[target] per row; `targets` are global ids. fp32 (fp64 for fp64 logits)."""
        tp, _, nr = self._layout(logits)
        return logprobs_kernel(logits, targets.to(logits.device), temperature, chunk_rows, self.group, tp,
                               self.start, nr)

    def entropy(self, logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = METRIC_CHUNK) -> torch.Tensor:
        """Entropy of softmax(logits / T) per row (no grad), fp32 (fp64 for fp64 logits)."""
        tp, rank, nr = self._layout(logits)
        return entropy_kernel(logits.detach(), temperature, chunk_rows, self.group, tp, rank, nr)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The global id of each row's largest logit (the smallest among ties), long."""
        tp, rank, nr = self._layout(logits)
        return argmax_kernel(logits.detach(), self.group, tp, rank, self.start, nr)

    def jsd(self, student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
            chunk_rows: int | None = None, inplace_grad: bool = False, compile: bool = False) -> torch.Tensor:
        """Generalized JSD_beta(teacher || student) per row (beta 0: KL(P || Q), 1: KL(Q || P)), teacher under
        stop-gradient. inplace_grad: the student logits are overwritten with their gradient during forward."""
        return self._divergence("jsd", student, teacher, beta, temperature, chunk_rows, inplace_grad, compile)

    def clipped_forward_kl(self, student: torch.Tensor, teacher: torch.Tensor, tau: float = 10.0,
                           temperature: float = 1.0, chunk_rows: int | None = None, inplace_grad: bool = False,
                           compile: bool = False) -> torch.Tensor:
        """sum_v min(p_v log(p_v / q_v), tau) per row (Search-E1 / OPSD), teacher under stop-gradient."""
        return self._divergence("clipped", student, teacher, tau, temperature, chunk_rows, inplace_grad, compile)

    def _divergence(self, kind, student, teacher, param, temperature, chunk_rows, inplace_grad, compile):
        tp, rank, nr = self._layout(student)
        return divergence_kernel(student, teacher, kind, param, temperature,
                                 PARALLEL_DIVERGENCE_CHUNK if chunk_rows is None else chunk_rows,
                                 self.group, tp, rank, nr, inplace_grad, compile)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """SUM of `t` over the ranks of the group, in place (returned)."""
        tp, _ = group_rank(self.group)
        if tp > 1:
            dist.all_reduce(t, group=self.group)
        return t


class SingleDeviceVocab(VocabShard):
    """The whole vocabulary on one device: the dense implementations, on the first `vocab_size` columns (all
    of them when None). Made by `VocabShard.single`."""

    def __post_init__(self):
        if self.start != 0 or self.end is not None or self.group is not None:
            raise ValueError("a single-device vocabulary has no columns or group: VocabShard.single(vocab_size)")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    def _real(self, logits: torch.Tensor) -> torch.Tensor:
        """The real columns of the logits (the padding at and beyond vocab_size cut off)."""
        if self.vocab_size is None or logits.shape[-1] == self.vocab_size:
            return logits
        if logits.shape[-1] < self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} have fewer than vocab_size={self.vocab_size} columns")
        return logits[..., :self.vocab_size]

    def logprobs(self, logits, targets, temperature=1.0, chunk_rows=METRIC_CHUNK):
        return token_logprobs(self._real(logits), targets.to(logits.device), temperature, chunk_rows)

    @torch.no_grad()
    def entropy(self, logits, temperature=1.0, chunk_rows=METRIC_CHUNK):
        x = self._real(logits.detach())
        lsm = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)) / temperature, -1)
        return -(lsm.exp() * lsm).sum(-1)

    @torch.no_grad()
    def argmax(self, logits):
        return self._real(logits.detach()).argmax(-1)

    def _divergence(self, kind, student, teacher, param, temperature, chunk_rows, inplace_grad, compile):
        fn = generalized_jsd if kind == "jsd" else clipped_forward_kl
        return fn(self._real(student), self._real(teacher), param, temperature,
                  DENSE_DIVERGENCE_CHUNK if chunk_rows is None else chunk_rows, inplace_grad, compile)

    def sum_over_shards(self, t):
        return t
