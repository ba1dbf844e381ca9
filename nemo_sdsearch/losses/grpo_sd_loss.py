"""The GRPO + SD-Search loss of one micro-batch, as one class with a written contract.

    loss, sums = GRPOSDLoss(...)(logits, micro_batch)

`logits` are the policy's logits at the micro-batch's policy positions, laid out as `vocab_shard` says
(`losses.shard.VocabShard`: [N, V] on one device, or this rank's vocabulary shard [N, Vp/tp] of a
tensor-parallel actor; every vocabulary operation goes through its methods, so the loss is one code for
both); `micro_batch` is a `PolicyMicroBatch`. The loss is

    sum_i w_i * (clipped_surrogate_i + kl_coef * k3_i)  +  sd_coef * sum_{query i} JSD_i * query_weight

with per-token weights w_i and the query weight fixed by the caller from GLOBAL counts (every token of
the whole rollout batch over all data-parallel replicas, see `token_weights`), so that the sum of the
micro-batch losses of all replicas is the loss of the whole batch, whatever its split. `sums` are
detached metric sums (pg_sum of the clipped surrogate, kl_sum, entropy_sum, clip, n_policy, jsd_sum, agree,
n_query) to be added over micro-batches and replicas and divided by their counts at the end.

The balance of the two terms: with an SD term, `pg_grad_sq` and `sd_grad_sq` are the squared norms of the
GRPO term's (surrogate + KL) and the SD term's gradients with respect to this micro-batch's logits (summed
over the vocabulary shards). Micro-batches and replicas hold disjoint positions, so their sum over a
mini-batch is the squared norm of each term's gradient with respect to all the logits of the batch's loss:
two extra backward passes through the loss head only (an [N, V] tensor each), none through the model. The
JSD is a mean per query token and the surrogate a mean per policy token, so `sd.coef`'s effective weight moves
with the query share; the ratio of these norms shows it. (A parameter-space split would need a second
backward through the whole model per step.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nemo_sdsearch.losses.policy import clipped_surrogate_per_token, k3_per_token
from nemo_sdsearch.losses.shard import VocabShard

METRIC_SUMS = ("pg_sum", "kl_sum", "entropy_sum", "clip", "n_policy", "jsd_sum", "agree", "n_query",
               "pg_grad_sq", "sd_grad_sq")


def jsd_at_queries(policy_logits: torch.Tensor, is_query_row: torch.Tensor, teacher_logits: torch.Tensor,
                   sd_cfg, vocab_shard: VocabShard | None = None) -> torch.Tensor:
    """Per query token generalized JSD(teacher || student).

    `policy_logits` are the student's logits at all policy positions of a micro-batch; only the rows
    flagged by `is_query_row` enter the divergence. `teacher_logits` are the teacher's logits at the
    same query positions (computed under no_grad).

    `vocab_shard` (default: one device): where both logits sit in the vocabulary. On a tensor-parallel
    actor both are this rank's shard of the padded vocabulary; the JSD is the full per-row value on every
    rank and its backward writes this shard's gradient only. `sd.compile` applies to either."""
    shard = vocab_shard or VocabShard.single()
    # The gathered rows are a private copy: the chunked JSD may store its gradient in place.
    return shard.jsd(policy_logits[is_query_row], teacher_logits.detach(), sd_cfg.beta,
                     sd_cfg.temperature, sd_cfg.chunk_rows, inplace_grad=True,
                     compile=sd_cfg.compile)


@dataclass
class PolicyMicroBatch:
    """One micro-batch of trajectories at its policy positions (N of them, row-major)."""
    batch: object                 # models.base.SequenceBatch: the token sequences, right-padded (the actor reads it)
    rows: torch.Tensor            # [N] sequence index of each policy position
    cols: torch.Tensor            # [N] its column (target position: predicted from cols - 1)
    is_query: torch.Tensor        # [N] bool: a search-query position (SD-Search's JSD applies)
    advantages: torch.Tensor      # [N] the GRPO advantage of the position's trajectory
    token_weights: torch.Tensor   # [N] loss weight of each position (global normalisation)
    query_weight: float = 0.0     # loss weight of each query position's JSD (1 / global query count)
    old_logprobs: torch.Tensor | None = None   # [N] None: the weights that sampled are the current ones
    ref_logprobs: torch.Tensor | None = None   # [N] None: no KL term
    # the teacher's logits at the query positions [Nq, V(/tp)], or a zero-argument function computing them
    # when asked (no grad), or None (GRPO, or no query position)
    teacher_logits: torch.Tensor | Callable[[], torch.Tensor | None] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def targets(self) -> torch.Tensor:
        return self.batch.input_ids[self.rows, self.cols]


def token_weights(rows: torch.Tensor, seq_lens: torch.Tensor, reduction: str, n_tokens: int, n_seqs: int,
                  scale: float = 1.0) -> torch.Tensor:
    """Per-position loss weights from global counts. token: 1 / n_tokens (the mean over every policy token
    of the batch); sequence: 1 / (len of its sequence * n_seqs) (per sequence, then the mean). `scale`
    multiplies them: a data-parallel actor that averages gradients over its dp replicas passes dp, so the
    average of the replicas' gradients is the gradient of the whole batch's loss."""
    if reduction == "token":
        return torch.full((rows.numel(),), scale / max(n_tokens, 1))
    return scale / (seq_lens[rows].to(torch.float32) * max(n_seqs, 1))


class GRPOSDLoss:
    """`vocab_shard`: the `VocabShard` of the logits (the actor's `vocab_shard`; None: one device)."""

    def __init__(self, clip_eps: float = 0.2, kl_coef: float = 0.001, kl_clamp: float | None = 10.0,
                 temperature: float = 1.0, sd=None, vocab_shard: VocabShard | None = None):
        self.clip_eps, self.kl_coef, self.kl_clamp = clip_eps, kl_coef, kl_clamp
        self.temperature, self.sd = temperature, sd
        self.vocab_shard: VocabShard = vocab_shard or VocabShard.single()

    @classmethod
    def from_config(cls, cfg, vocab_shard: VocabShard | None = None) -> "GRPOSDLoss":
        g = cfg.grpo
        return cls(g.clip_eps, g.kl_coef, g.kl_clamp, cfg.rollout.temperature,
                   cfg.sd if cfg.algorithm == "sd_search" else None, vocab_shard)

    def logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.vocab_shard.logprobs(logits, targets, self.temperature)

    def __call__(self, logits: torch.Tensor, mb: PolicyMicroBatch) -> tuple[torch.Tensor, dict]:
        shard = self.vocab_shard
        logp = self.logprobs(logits, mb.targets)
        w = mb.token_weights.to(logp.device, logp.dtype)
        old = logp.detach() if mb.old_logprobs is None else mb.old_logprobs.to(logp.device)
        surr, clipped = clipped_surrogate_per_token(logp, old, mb.advantages.to(logp.device), self.clip_eps)
        loss = (surr * w).sum()
        sums = dict.fromkeys(METRIC_SUMS, 0.0)
        if mb.ref_logprobs is not None and self.kl_coef > 0:
            kl = k3_per_token(logp, mb.ref_logprobs.to(logp.device), clamp=self.kl_clamp)
            loss = loss + self.kl_coef * (kl * w).sum()
            sums["kl_sum"] = float(kl.detach().sum())
        pg_loss = loss
        # the entropy of the sampling policy: softmax(logits / rollout.temperature)
        sums["entropy_sum"] = float(shard.entropy(logits, self.temperature).sum())
        sums["pg_sum"] = float(surr.detach().sum())
        sums["clip"], sums["n_policy"] = float(clipped.sum()), int(mb.rows.numel())
        teacher = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
        if self.sd is not None and teacher is not None:
            is_q = mb.is_query.to(logits.device)
            jsd = jsd_at_queries(logits, is_q, teacher, self.sd, vocab_shard=shard)
            sd_loss = self.sd.coef * mb.query_weight * jsd.sum()
            loss = loss + sd_loss
            if logits.requires_grad:
                sums["pg_grad_sq"], sums["sd_grad_sq"] = self._logit_grad_sq(logits, pg_loss, sd_loss)
            with torch.no_grad():
                agree = shard.argmax(logits[is_q]) == shard.argmax(teacher)
            sums["jsd_sum"], sums["agree"], sums["n_query"] = float(jsd.detach().sum()), float(agree.sum()), int(is_q.sum())
        return loss, sums

    def _logit_grad_sq(self, logits: torch.Tensor, *terms: torch.Tensor) -> tuple[float, ...]:
        """Squared norms of each term's gradient with respect to `logits` (the whole vocabulary: the shards'
        squares summed over the tensor-parallel group); the graph is kept for the loss's own backward."""
        out = []
        for term in terms:
            if not term.requires_grad:
                out.append(0.0)
                continue
            (g,) = torch.autograd.grad(term, logits, retain_graph=True, allow_unused=True)
            out.append(torch.zeros((), dtype=torch.float64) if g is None else g.detach().double().pow(2).sum())
        sq = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=logits.device) for x in out])
        return tuple(float(x) for x in self.vocab_shard.sum_over_shards(sq).cpu())
