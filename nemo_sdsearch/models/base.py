"""The `Actor` seam: what training algorithms need from a model backend.

A `SequenceBatch` is a right-padded batch of token sequences. Positions are *target* positions: the
log-prob or logits "at position t" are those of the model predicting token t from tokens < t, so they
come from the hidden state at t-1. Backends compute the LM head only on the requested rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from nemo_sdsearch.losses.shard import VocabShard
from nemo_sdsearch.models.offload import Parkable


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


@dataclass
class TeacherPass:
    """A deferred no-grad teacher forward: `scorer.teacher_logits_at(make_batch(), rows, cols)`. Callable (a loss
    calls it when it needs the logits, one micro-batch at a time) and batchable: a pipeline-parallel actor runs a
    window of them in one forward-only schedule (`MegatronActor.train_on`). `timer["teacher_s"]` (when given)
    accumulates the time."""
    scorer: object
    make_batch: Callable[[], "SequenceBatch"]
    rows: torch.Tensor
    cols: torch.Tensor
    timer: dict | None = None

    def __call__(self) -> torch.Tensor:
        import time

        t0 = time.perf_counter()
        out = self.scorer.teacher_logits_at(self.make_batch(), self.rows, self.cols)
        if self.timer is not None:
            self.timer["teacher_s"] = self.timer.get("teacher_s", 0.0) + time.perf_counter() - t0
        return out


def require_fp32_params(named_parameters, who: str, fix: str) -> None:
    """Refuse to train parameters that are not fp32: an optimizer stepping bf16/fp16 weights in place
    rounds away most small updates (no fp32 master copy). Frozen parameters may have any dtype."""
    bad = [(n, p.dtype) for n, p in named_parameters if p.requires_grad and p.dtype != torch.float32]
    if bad:
        name, dtype = bad[0]
        raise ValueError(f"{who} trains fp32 master weights, but {len(bad)} trainable parameters are {dtype} "
                         f"(first: {name}); {fix}. bf16 speed comes from autocast in the forward pass.")


def positions_from_mask(mask, shape: tuple[int, int] | None = None,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the target positions a [B, T] mask marks: a bool tensor, or one list of flags per row
    (shorter rows padded with False to `shape`); column 0 is never a target position (nothing precedes it).
    The one home of this rule: every loss that selects positions by a mask takes them from here."""
    if isinstance(mask, torch.Tensor):
        mask = mask.clone()
    else:
        flags, mask = mask, torch.zeros(shape, dtype=torch.bool)
        for i, row in enumerate(flags):
            mask[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.bool)
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    return (rows, cols) if device is None else (rows.to(device), cols.to(device))


class Actor(Parkable, ABC):
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
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weight stream: every weight as (Hugging Face name, full tensor), one at a time, each name
        once, in a fixed order (the HF model's `state_dict()` order). A tied output embedding is not
        repeated: `lm_head.weight` is left out, as in HF files (loading the embedding sets it).

        What generation refit (`Generator.refit`) and the final checkpoint
        (`checkpoint.hf_writer.save_hf_checkpoint_from_stream`) consume. A consumer keeps only what it
        still needs: a tensor it drops is freed, so one that loads the stream in buckets of B bytes
        holds at most B plus the largest tensor, never the whole model. Tensors may share memory with
        the trained parameters (HFActor yields its state dict as is): consume the stream before the next
        train step. Distributed actors make each tensor with collectives: EVERY rank of the replica's
        tp x pp group must iterate the stream to its end, in step, also the ranks that keep nothing;
        each of them receives every tensor."""

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The whole stream at once, as a dict (holds the full model: tests and small models). Backends
        add a tied `lm_head.weight` (the embedding) so that it equals the HF `state_dict()`."""
        return dict(self.iter_weights())

    # -- the recipe's view of parallelism (defaults: one process, one replica) --------------------------
    # A data-parallel replica is the tp x pp ranks that hold one copy of the model; its leader (tp rank 0,
    # pp rank 0) runs the replica's generator. dp_size replicas split every rollout batch.
    dp_size: int = 1
    dp_rank: int = 0
    is_replica_leader: bool = True
    # where logits_at's columns sit in the vocabulary, with the vocabulary math the losses do on them: one device
    # (the default), or this rank's shard over a tensor-parallel group (losses.shard)
    vocab_shard: VocabShard = VocabShard.single()

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM of `tensor` over the data-parallel replicas (in place, returned)."""
        return tensor

    def all_gather_dp(self, obj) -> list:
        """Every data-parallel replica's `obj` (picklable), in replica order, on every rank."""
        return [obj]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank of the job (all replicas)."""
        return flag

    def broadcast_in_replica(self, obj):
        """The replica leader's `obj` on every rank of its replica (others pass anything, e.g. None)."""
        return obj

    def gather_in_replica(self, obj) -> list | None:
        """Every rank's `obj` of this replica on its leader (in replica rank order, leader first); None on
        the other ranks."""
        return [obj]

    @property
    def replica_ranks(self) -> list[int]:
        """The global ranks of this replica, leader first."""
        return [0]

    def reduce_metric_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Metric sums taken where the loss runs (the last pipeline stage) made whole: on every rank of the
        replica, summed over replicas."""
        return self.all_reduce_dp(sums)

    @abstractmethod
    def save_state(self, checkpoints, step: int, write_loop_state: Callable[[dict], None]) -> None:
        """Write the training state of step `step` (collective on a distributed actor); on rank 0 call
        `write_loop_state(extra)` with what the loop's checkpoint file must hold to find it again."""

    @abstractmethod
    def load_state(self, checkpoints, state: dict) -> None:
        """Restore the training state named by a loop checkpoint `state` (written via `save_state`)."""

    # -- stages of one process (Search-E1 runs GRPO, pool, OPSD and evaluation over one actor) --------------
    @abstractmethod
    def reset_optimizer(self, lr: float) -> None:
        """A fresh optimizer (no moments, no step count) at learning rate `lr`: what a new training stage starts
        with, without rebuilding the model."""

    @abstractmethod
    def copy_weights_from(self, other: "Actor") -> None:
        """This (frozen) copy takes `other`'s current weights, shard by shard (same backend and layout): the
        reference / teacher of a stage becomes the stage's start weights."""

    @abstractmethod
    def load_weights_from_dir(self, path) -> None:
        """The weights of a Hugging Face directory (read tensor by tensor: only this rank's shard)."""

    # -- adapter mode (Search-E1's LoRA OPSD round, search_e1.adapter=lora; the hf actor has it: models/hf.py) ------
    # The same actor trains a LoRA adapter instead of its weights (train_on / train_step unchanged), its teacher is
    # the same model with the adapter off, and the adapter is merged into the weights at the end.
    def enable_adapter(self, wrap: Callable) -> None:
        """Put the adapter `wrap(model)` on the model (in place); from here only the adapter trains."""
        raise NotImplementedError(f"{type(self).__name__} has no adapter mode: use search_e1.adapter=full")

    def adapter_off(self):
        """The teacher of adapter mode: a scorer (`teacher_logits_at`) over the model with the adapter disabled."""
        raise NotImplementedError(f"{type(self).__name__} has no adapter mode: use search_e1.adapter=full")

    def adapter_state(self) -> dict:
        """A copy of the adapter's weights (to keep a round's best one)."""
        raise NotImplementedError(f"{type(self).__name__} has no adapter mode: use search_e1.adapter=full")

    def merge_adapter(self, state: dict | None = None) -> None:
        """End adapter mode: the adapter (`state` when given) merged into the weights, all of them trainable again."""
        raise NotImplementedError(f"{type(self).__name__} has no adapter mode: use search_e1.adapter=full")

    def train_on(self, micro_batches: Sequence, loss_fn: Callable) -> dict:
        """One optimizer step over `micro_batches` (objects with .batch, .rows, .cols): backward of
        `loss_fn(logits_at(mb.batch, mb.rows, mb.cols), mb)` for each. Backends that cannot run a loss
        closure (pipeline stages) override this; the recipe calls only this."""
        return self.train_step(lambda k: loss_fn(self.logits_at(micro_batches[k].batch, micro_batches[k].rows,
                                                                micro_batches[k].cols), micro_batches[k]),
                               len(micro_batches))
