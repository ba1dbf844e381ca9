"""The `Actor` seam: what training algorithms need from a model backend.

A `SequenceBatch` is a right-padded batch of token sequences. Positions are *target* positions: the
log-prob or logits "at position t" are those of the model predicting token t from tokens < t, so they
come from the hidden state at t-1. Backends compute the LM head only on the requested rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor       # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long (1 = real token)

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> "SequenceBatch":
        if not seqs:
            raise ValueError("empty batch")
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        return cls(ids.to(device), mask.to(device))

    @property
    def shape(self):
        return tuple(self.input_ids.shape)


def require_fp32_params(named_parameters, who: str, fix: str) -> None:
    """Refuse to train parameters that are not fp32: an optimizer stepping bf16/fp16 weights in place
    rounds away most small updates (no fp32 master copy). Frozen parameters may have any dtype."""
    bad = [(n, p.dtype) for n, p in named_parameters if p.requires_grad and p.dtype != torch.float32]
    if bad:
        name, dtype = bad[0]
        raise ValueError(f"{who} trains fp32 master weights, but {len(bad)} trainable parameters are {dtype} "
                         f"(first: {name}); {fix}. bf16 speed comes from autocast in the forward pass.")


def positions_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the True entries of a [B, T] mask; column 0 is never a target position."""
    mask = mask.clone()
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


class Actor(ABC):
    """Logits/log-probs at selected positions, a no-grad teacher pass, a train step, weight export."""

    @abstractmethod
    def logits_at(self, batch: SequenceBatch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[N, vocab] logits predicting token (rows[i], cols[i]); differentiable."""

    @abstractmethod
    def teacher_logits_at(self, batch: SequenceBatch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Same as `logits_at` under no_grad (the teacher pass: same weights, no gradient)."""

    @abstractmethod
    def logprobs_at(self, batch: SequenceBatch, rows: torch.Tensor, cols: torch.Tensor,
                    temperature: float = 1.0, with_grad: bool = True) -> torch.Tensor:
        """[N] log-probs of the tokens at (rows, cols)."""

    @abstractmethod
    def train_step(self, micro_batch_losses: Callable[[int], torch.Tensor], n_micro: int) -> dict:
        """Zero grads; for each micro-batch i, backward `micro_batch_losses(i)`; clip; step. Returns stats;
        a non-finite loss or gradient skips the optimizer step (stats["skipped"] = True)."""

    @abstractmethod
    def export_weights(self) -> dict[str, torch.Tensor]:
        """Weights for generation refit and checkpoints."""
