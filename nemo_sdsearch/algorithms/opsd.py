"""Search-E1's on-policy self-distillation (OPSD) step through the actor seam: one step for both adapter modes.

The student is the trained actor; the teacher scores the same student response with its own prompt. Where the
student and teacher come from is the round's choice (`search_e1.opsd_round`), the step is the same:
- `search_e1.adapter=full` (any backend, tensor / pipeline / data parallel): every weight trains, and the teacher
  is the frozen copy of the same weights taken at the start of the round (the reference actor that
  `build_components` builds);
- `search_e1.adapter=lora` (the hf actor): the actor in adapter mode (`HFActor.enable_adapter`) trains a LoRA
  adapter, and the teacher is the same model with the adapter off (`HFActor.adapter_off()`). The two teachers
  are the same function: the adapter starts at zero and the base weights never move.
Both score the SAME student response: the student with its own prompt P_S(q), the teacher with
P_T(q, reference trajectory), so student position j is teacher position j + shift.

    loss = sum_pairs sum_{j in R_tau} w_j * sum_v min(p_t,v log(p_t,v / p_s,v), tau)

(`losses.opsd_loss.OPSDLoss`) with the weights of `opsd_weights` (eq. 7: 1 / |R_tau| per position, then the mean
over the step's pairs; or the token mean), computed from the counts of the WHOLE step's batch of pairs: every rank
holds every pair, each data-parallel replica trains on every dp-th pair, and the weights are scaled by dp
since the actor averages gradients over the replicas, so any split makes the single-process update.
The clipped KL is the actor's `VocabShard`'s (losses/shard.py): dense on one device, vocab-parallel on the
shards of a tensor-parallel actor, one call either way. The optimizer step, its gradient clipping and the skip
of a non-finite loss or gradient are the actor's own (`train_on`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nemo_sdsearch.losses.opsd_loss import OPSDLoss
from nemo_sdsearch.models.base import SequenceBatch, TeacherPass, positions_from_mask


@dataclass
class OPSDMicroBatch:
    """Student sequences at their scored (policy) positions, and the teacher's logits there (computed
    when the loss asks: a zero-argument function, run under no_grad by the frozen teacher). What
    `losses.opsd_loss.OPSDLoss` reads."""
    batch: SequenceBatch
    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor
    teacher_logits: torch.Tensor | Callable[[], torch.Tensor]
    extra: dict = field(default_factory=dict)


def opsd_counts(policy_masks) -> tuple[int, int]:
    """(pairs with at least one scored position, scored positions) of a step's batch of pairs, from their
    student policy masks (position 0 is never a target): the global counts `opsd_weights` normalises by."""
    n_positions = sum(sum(m[1:]) for m in policy_masks)
    n_pairs = sum(1 for m in policy_masks if any(m[1:]))
    return n_pairs, n_positions


def opsd_weights(policy_masks, normalization: str, n_pairs: int, n_positions: int) -> torch.Tensor:
    """Loss weight of every scored position (row-major over the micro-batch, as `positions_from_mask` orders
    them). trajectory (the paper's eq. 7): 1 / |R_tau| per position of a pair, then the mean over the
    step's pairs; token: the mean over all the step's positions."""
    counts = [sum(m[1:]) for m in policy_masks]  # position 0 is never a target
    if normalization == "token":
        return torch.full((sum(counts),), 1.0 / max(n_positions, 1))
    return torch.cat([torch.full((c,), 1.0 / (c * n_pairs)) for c in counts if c] or [torch.zeros(0)])


def opsd_micro_batches(items, actor, teacher, pad_id: int, micro_batch_size: int,
                       weights_fn: Callable[[list], torch.Tensor]) -> list[OPSDMicroBatch]:
    """Micro-batches of `items` ((student ids, teacher ids, shift, student policy mask) per pair);
    `weights_fn(masks)` gives their positions' loss weights (row-major, as the positions below). `teacher`: a
    scorer with `teacher_logits_at` (the frozen reference, or the actor's `adapter_off()`)."""
    out = []
    for i in range(0, len(items), micro_batch_size):
        mb = items[i:i + micro_batch_size]
        sb = SequenceBatch.from_lists([x[0] for x in mb], pad_id, actor.device)
        rows, cols = positions_from_mask([x[3] for x in mb], sb.shape, actor.device)
        shift = torch.tensor([x[2] for x in mb], device=actor.device)
        make = lambda mb=mb: SequenceBatch.from_lists([x[1] for x in mb], pad_id, actor.device)
        out.append(OPSDMicroBatch(sb, rows, cols, weights_fn([x[3] for x in mb]),
                                  TeacherPass(teacher, make, rows, cols + shift[rows])))
    return out


def opsd_step(actor, teacher, batch: list, e1, pad_id: int) -> dict:
    """One optimizer step of `actor` on the step's pairs `batch` (the same list on every rank; this replica takes
    every dp-th pair) toward `teacher` (the frozen reference, or the actor's own `adapter_off()` in adapter mode).
    Returns {"loss", "skipped", "grad_norm"} for the whole batch (all replicas)."""
    dp = actor.dp_size
    n_pairs, n_pos = opsd_counts([it[3] for it in batch])
    mine = batch[actor.dp_rank::dp]
    # A replica without a pair (fewer mined pairs than replicas) still takes part in the step's collectives: it
    # scores the step's first pair at weight 0, so its gradient and loss are zero and every rank decides alike.
    idle = not mine
    weights = lambda ms: opsd_weights(ms, e1.loss_normalization, n_pairs, n_pos) * (0.0 if idle else dp)
    loss_fn = OPSDLoss(e1.tau_clip, actor.vocab_shard)
    mbs = opsd_micro_batches(batch[:1] if idle else mine, actor, teacher, pad_id, e1.opsd_micro_batch_size, weights)
    stats = actor.train_on(mbs, lambda logits, mb: loss_fn(logits, mb)[0])
    total = float(actor.all_reduce_dp(torch.tensor([float(stats["loss"])], dtype=torch.float64))) / dp
    return {"loss": total, "skipped": bool(stats["skipped"]), "grad_norm": stats.get("grad_norm")}
