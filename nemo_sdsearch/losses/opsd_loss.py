"""The OPSD (Search-E1) loss of one micro-batch: the clipped forward KL from the teacher to the student.

    loss, sums = OPSDLoss(tau, vocab_shard)(logits, micro_batch)

`logits` are the student's logits at the micro-batch's scored (policy) positions, laid out as `vocab_shard` says
(`losses.shard.VocabShard`: [N, V] on one device, or this rank's vocabulary shard of a tensor-parallel actor);
`micro_batch` has `.weights` ([N] loss weight of each position, fixed by the caller from the step's global counts:
`algorithms.opsd.opsd_weights`) and `.teacher_logits` (the teacher's logits at the same N positions, [N, V(/tp)],
or a zero-argument function computing them when asked, under no grad). The loss is

    sum_i w_i * sum_v min(p_t,v log(p_t,v / p_s,v), tau)

(p_t the teacher's distribution, p_s the student's; the clip per vocabulary entry, before the sum). `sums`:
detached metric sums, "kl_sum" (the unweighted terms) and "n" (the positions).
"""

from __future__ import annotations

import torch

from nemo_sdsearch.losses.shard import VocabShard


class OPSDLoss:
    """(student logits at the micro-batch's positions, micro-batch) -> (loss, {"kl_sum", "n"}).
    `vocab_shard`: the `VocabShard` of the logits (the actor's; None: one device)."""

    def __init__(self, tau: float, vocab_shard: VocabShard | None = None):
        self.tau = float(tau)
        self.vocab_shard: VocabShard = vocab_shard or VocabShard.single()

    def __call__(self, logits: torch.Tensor, mb) -> tuple[torch.Tensor, dict]:
        teacher = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
        terms = self.vocab_shard.clipped_forward_kl(logits, teacher, self.tau)
        loss = (terms * mb.weights.to(terms.device)).sum()
        return loss, {"kl_sum": float(terms.detach().sum()), "n": int(terms.numel())}
