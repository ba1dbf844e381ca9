"""Data parallelism that divides the work, in process: each replica takes whole question groups of the
shared batch and generates once per step; the loss of every replica's share, normalised by the global
counts, adds up to the single-process loss of the whole batch (the exact `GRPOSDLoss` that trains).
The end-to-end check (torchrun, TP x DP and PP x DP against actor=hf) is in test_megatron_train.py."""

import pytest
import torch

from nemo_sdsearch.algorithms.grpo import replica_rollouts
from nemo_sdsearch.config import SDSection
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.losses.grpo_sd_loss import GRPOSDLoss, PolicyMicroBatch, token_weights
from nemo_sdsearch.models.base import SequenceBatch


class Replica:
    """The parallel view of one data-parallel replica (its leader), as the recipe sees an actor."""

    def __init__(self, rank, size):
        self.dp_rank, self.dp_size, self.is_replica_leader = rank, size, True

    def broadcast_in_replica(self, obj):
        return obj


class CountingEngine:
    def __init__(self):
        self.calls = []

    def run(self, questions, n_samples, seed):
        self.calls.append([q.id for q in questions])
        return [(q.id, j) for q in questions for j in range(n_samples)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_replicas_take_disjoint_whole_groups_and_generate_once(dp):
    questions = [QA(f"q{i}", f"question {i}?", ["a"]) for i in range(8)]
    engines = [CountingEngine() for _ in range(dp)]
    shares = [replica_rollouts(Replica(r, dp), engines[r], questions, 5, seed=7) for r in range(dp)]
    ids = [q for e in engines for call in e.calls for q in call]
    assert all(len(e.calls) == 1 for e in engines)                  # one generation per replica and step
    assert sorted(ids) == sorted(q.id for q in questions) and len(set(ids)) == len(ids)  # disjoint, complete
    for share in shares:                                            # whole groups of 5 rollouts
        assert len(share) % 5 == 0 and all(share[i][0] == share[i - i % 5][0] for i in range(len(share)))


def _micro_batch(g, n_rows, vocab, scale, n_tokens, n_query, reduction="token"):
    """A micro-batch of `n_rows` sequences with random policy positions, advantages and teacher logits."""
    T = 9
    batch = SequenceBatch.from_lists([list(range(1, T + 1))] * n_rows, pad_id=0)
    mask = torch.rand(n_rows, T, generator=g) < 0.6
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    is_q = torch.rand(rows.numel(), generator=g) < 0.4
    adv = torch.randn(n_rows, generator=g, dtype=torch.float64).float()[rows]
    seq_lens = torch.bincount(rows, minlength=n_rows).clamp(min=1)
    teacher = torch.randn(int(is_q.sum()), vocab, generator=g)
    ref = torch.randn(rows.numel(), generator=g) * 0.1 - 2.0
    return PolicyMicroBatch(batch, rows, cols, is_q, adv, token_weights(rows, seq_lens, reduction, n_tokens, n_rows * 2, scale),
                            query_weight=scale / n_query, ref_logprobs=ref, teacher_logits=teacher)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_replica_losses_add_up_to_the_whole_batch_loss(reduction):
    """Two replicas with 3 sequences each, weights from the GLOBAL counts scaled by dp = 2: the mean of
    their losses and gradients (what the data-parallel all-reduce computes) equals one process holding all
    6 sequences in one micro-batch with its own counts."""
    g = torch.Generator().manual_seed(0)
    vocab, dp = 40, 2
    loss_fn = GRPOSDLoss(kl_coef=0.01, sd=SDSection(coef=0.5))
    parts = [_micro_batch(g, 3, vocab, 1.0, 1, 1, reduction) for _ in range(dp)]
    logits = [torch.randn(int(p.rows.numel()), vocab, generator=g, dtype=torch.float64) for p in parts]
    n_tokens = sum(int(p.rows.numel()) for p in parts)
    n_query = sum(int(p.is_query.sum()) for p in parts)
    cat = lambda f: torch.cat([f(p) for p in parts])
    whole = PolicyMicroBatch(
        SequenceBatch(cat(lambda p: p.batch.input_ids), cat(lambda p: p.batch.attention_mask)),
        torch.cat([p.rows + 3 * k for k, p in enumerate(parts)]), cat(lambda p: p.cols), cat(lambda p: p.is_query),
        cat(lambda p: p.advantages), torch.zeros(0), ref_logprobs=cat(lambda p: p.ref_logprobs),
        teacher_logits=cat(lambda p: p.teacher_logits))
    whole.token_weights = token_weights(whole.rows, torch.bincount(whole.rows, minlength=6).clamp(min=1), reduction,
                                        n_tokens, 6)
    whole.query_weight = 1.0 / n_query
    x = torch.cat(logits).requires_grad_()
    loss_whole, sums_whole = loss_fn(x, whole)
    loss_whole.backward()
    split_losses, split_grads, split_sums = [], [], {}
    for p, lg in zip(parts, logits):        # each replica: its share, global counts, scaled by dp
        p.token_weights = token_weights(p.rows, torch.bincount(p.rows, minlength=3).clamp(min=1), reduction,
                                        n_tokens, 6, scale=dp)
        p.query_weight = dp / n_query
        y = lg.clone().requires_grad_()
        loss, sums = loss_fn(y, p)
        loss.backward()
        split_losses.append(float(loss.detach()))
        split_grads.append(y.grad)
        split_sums = {k: split_sums.get(k, 0) + v for k, v in sums.items()}
    assert sum(split_losses) / dp == pytest.approx(float(loss_whole.detach()), rel=1e-12)
    assert torch.allclose(torch.cat(split_grads) / dp, x.grad, rtol=1e-10, atol=1e-15)
    for k, v in sums_whole.items():          # metric sums add up over replicas
        if k.endswith("_grad_sq"):           # each replica's logit gradients carry its dp scale: squared, dp**2
            assert v > 0 and split_sums[k] / dp ** 2 == pytest.approx(v, rel=1e-10), k   # (grpo.term_grad_norms)
            continue
        assert split_sums[k] == pytest.approx(v, rel=1e-12), k
    # normalising by a replica's LOCAL counts instead would not give the whole-batch gradient
    local = parts[0]
    local.token_weights = token_weights(local.rows, torch.bincount(local.rows, minlength=3).clamp(min=1), reduction,
                                        int(local.rows.numel()), 3, scale=dp)
    y = logits[0].clone().requires_grad_()
    loss_fn(y, local)[0].backward()
    assert not torch.allclose(y.grad / dp, x.grad[:len(y)], rtol=1e-6)
