"""What trains: the objectives against independent fp64 oracles, and one update of each algorithm in the
direction its objective says.

The oracles below are written from the papers' formulas (docs: `losses/grpo_sd_loss.py`, `losses/policy.py`,
`losses/divergences.py`, `losses/opsd_loss.py`, `algorithms/opsd.py`), in plain Python floats with the `math` module: no torch op
and no project function takes part, so a wrong sign, shift, mask or label in the code cannot cancel out in
the comparison. Gradients are the oracle's central finite differences (fp64), compared with autograd
through the project's losses. The direction tests then run one real optimizer step (the project's actor,
the recipe's micro-batch assembly) and check that the quantities move the way the objective says.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from types import SimpleNamespace

import pytest
import torch

from nemo_sdsearch.algorithms.opsd import opsd_weights
from nemo_sdsearch.losses.grpo_sd_loss import GRPOSDLoss, PolicyMicroBatch, token_weights
from nemo_sdsearch.losses.opsd_loss import OPSDLoss
from nemo_sdsearch.models.base import SequenceBatch

D = torch.float64


# ---------------------------------------------------------------------------------------------------
# The oracles (plain Python)
# ---------------------------------------------------------------------------------------------------
def log_softmax(row, temperature=1.0):
    x = [v / temperature for v in row]
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def kl(p_log, q_log):
    """KL(P || Q) = sum_v P_v (log P_v - log Q_v) from log-probabilities."""
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log))


def jsd(teacher_row, student_row, beta, temperature):
    """Generalized JSD_beta(P || Q), P = teacher, Q = student: beta KL(P||M) + (1-beta) KL(Q||M),
    M = beta P + (1-beta) Q; beta = 0 is KL(P||Q), beta = 1 is KL(Q||P) (TRL / GKD)."""
    t, s = log_softmax(teacher_row, temperature), log_softmax(student_row, temperature)
    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = [math.log(beta * math.exp(a) + (1 - beta) * math.exp(b)) for a, b in zip(t, s)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def clipped_forward_kl(teacher_row, student_row, tau, temperature=1.0):
    """sum_v min(P_v log(P_v / Q_v), tau)."""
    t, s = log_softmax(teacher_row, temperature), log_softmax(student_row, temperature)
    return sum(min(math.exp(a) * (a - b), tau) for a, b in zip(t, s))


def grpo_sd_oracle(logits, case):
    """The loss of one micro-batch and its metric sums, from the written objective:

        sum_i w_i * ( -min(r_i A_i, clip(r_i, 1-eps, 1+eps) A_i)  +  kl_coef * min(k3_i, clamp) )
        + sd_coef * query_weight * sum_{query i} JSD_beta(teacher_i || student_i)

    r_i = exp(logp_i - old_i), logp_i = log softmax(logits_i / T)[target_i], k3_i = exp(d) - d - 1 with
    d = ref_i - logp_i (an estimate of KL(pi || pi_ref) >= 0)."""
    c = case
    loss, pg, kl_sum, clip = 0.0, 0.0, 0.0, 0
    for i, row in enumerate(logits):
        logp = log_softmax(row, c["temperature"])[c["targets"][i]]
        old = c["old"][i] if c["old"] is not None else c["old_at_base"][i]
        ratio = math.exp(logp - old)
        a = c["adv"][i]
        lo, hi = 1 - c["clip_eps"], 1 + c["clip_eps"]
        unclipped, clipped = ratio * a, min(max(ratio, lo), hi) * a
        surr = -min(unclipped, clipped)
        clip += clipped < unclipped
        term = surr
        if c["ref"] is not None and c["kl_coef"] > 0:
            d = c["ref"][i] - logp
            k3 = math.exp(d) - d - 1
            if c["kl_clamp"] is not None:
                k3 = min(k3, c["kl_clamp"])
            term += c["kl_coef"] * k3
            kl_sum += k3
        loss += c["weights"][i] * term
        pg += surr
    jsd_sum, agree, n_query = 0.0, 0, 0
    if c["sd"] is not None:
        q_rows = [i for i, q in enumerate(c["is_query"]) if q]
        for k, i in enumerate(q_rows):
            teacher = c["teacher"][k]
            j = jsd(teacher, logits[i], c["sd"].beta, c["sd"].temperature)
            loss += c["sd"].coef * c["query_weight"] * j
            jsd_sum += j
            agree += max(range(len(teacher)), key=teacher.__getitem__) == max(range(len(logits[i])),
                                                                                key=logits[i].__getitem__)
            n_query += 1
    # the entropy of the policy that samples: softmax(logits / T), T = rollout.temperature
    entropy = sum(-sum(math.exp(v) * v for v in log_softmax(row, c["temperature"])) for row in logits)
    return loss, {"pg_sum": pg, "kl_sum": kl_sum, "clip": clip, "n_policy": len(logits), "jsd_sum": jsd_sum,
                  "agree": agree, "n_query": n_query, "entropy_sum": entropy}


def fd_gradient(fn, logits, h=1e-6):
    """Central finite differences of the scalar fn(list of rows) with respect to every logit."""
    grad = []
    for i, row in enumerate(logits):
        g = []
        for v in range(len(row)):
            plus = [list(r) for r in logits]
            minus = [list(r) for r in logits]
            plus[i][v] += h
            minus[i][v] -= h
            g.append((fn(plus) - fn(minus)) / (2 * h))
        grad.append(g)
    return grad


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------
N, V = 6, 7


def _case(name):
    """A micro-batch of N policy positions over a vocabulary of V: logits (std 2), targets, advantages of
    both signs, old log-probs giving ratios inside and outside the clip range on both sides, reference
    log-probs above and below the current ones, query rows with their teacher logits."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    logits = (torch.randn(N, V, generator=g, dtype=D) * 2).tolist()
    targets = [3, 0, 6, 2, 5, 1]
    adv = [1.3, -0.7, 0.9, -1.6, 0.4, -0.2]
    base = dict(name=name, logits=logits, targets=targets, adv=adv, clip_eps=0.2, temperature=1.0, old=None,
                ref=None, kl_coef=0.0, kl_clamp=10.0, sd=None, is_query=[False] * N, teacher=None,
                query_weight=0.0, weights=[1.0 / N] * N)
    T = {"grpo_ratio_one": 1.0, "grpo_clipped": 0.7, "kl": 0.7, "kl_clamped": 1.0, "kl_unclamped": 1.0}.get(name, 1.0)
    base["temperature"] = T
    logp = [log_softmax(r, T)[t] for r, t in zip(logits, targets)]
    base["old_at_base"] = logp
    # ratios exp(+-0.5) (clipped where the sign of A makes the clip bind) and exp(+-0.05) (inside)
    offsets = [0.5, 0.5, -0.5, -0.5, 0.05, -0.05]
    if name != "grpo_ratio_one":
        base["old"] = [lp - o for lp, o in zip(logp, offsets)]
    if name.startswith("kl"):
        base["kl_coef"] = 0.3
        # kl_wide: a clamp of 30 and a reference 30.5 nats below the policy: k3 = 29.5 is exact (no clamp binds)
        # (-30.5: inside (-clamp - 1, -clamp), where a log-ratio clamp at the value clamp itself would bind)
        d = [1.2, -30.5 if name == "kl_wide" else -0.8, 0.3, -2.5, 3.5, -0.1]
        base["ref"] = [lp + x for lp, x in zip(logp, d)]
        base["kl_clamp"] = {"kl": 10.0, "kl_clamped": 0.5, "kl_unclamped": None, "kl_off": 10.0, "kl_wide": 30.0}[name]
        if name == "kl_off":  # reference log-probs present, coefficient 0: no KL term and no KL metric
            base["kl_coef"] = 0.0
    if name.startswith("sd"):
        beta = {"sd_beta0": 0.0, "sd_beta1": 1.0, "sd_beta03": 0.3}.get(name, 0.5)
        base["sd"] = SimpleNamespace(coef=0.8, beta=beta, temperature=1.3, chunk_rows=2, compile=False)
        base["is_query"] = [False, True, True, False, True, True]
        base["teacher"] = (torch.randn(4, V, generator=g, dtype=D) * 2).tolist()
        base["teacher"][0] = list(logits[1])  # one query row where teacher == student (JSD 0, agreement)
        base["query_weight"] = 0.25
        base["weights"] = [0.1, 0.3, 0.05, 0.2, 0.15, 0.2]  # sequence-style unequal weights
    return base


CASES = ["grpo_ratio_one", "grpo_clipped", "kl", "kl_clamped", "kl_unclamped", "kl_off", "kl_wide", "sd", "sd_beta0", "sd_beta1",
         "sd_beta03"]


def _micro_batch(c, logits=None):
    rows = torch.arange(N)
    cols = torch.ones(N, dtype=torch.long)
    ids = torch.zeros(N, 2, dtype=torch.long)
    ids[:, 1] = torch.tensor(c["targets"])
    batch = SequenceBatch(ids, torch.ones_like(ids))
    t = lambda x: None if x is None else torch.tensor(x, dtype=D)
    return PolicyMicroBatch(batch, rows, cols, torch.tensor(c["is_query"]), t(c["adv"]), t(c["weights"]),
                            query_weight=c["query_weight"], old_logprobs=t(c["old"]), ref_logprobs=t(c["ref"]),
                            teacher_logits=t(c["teacher"]))


def _loss_fn(c, vocab_shard=None):
    return GRPOSDLoss(clip_eps=c["clip_eps"], kl_coef=c["kl_coef"], kl_clamp=c["kl_clamp"],
                      temperature=c["temperature"], sd=c["sd"], vocab_shard=vocab_shard)


def _check_sums(sums, expected):
    for k in ("pg_sum", "kl_sum", "jsd_sum", "entropy_sum"):
        assert sums[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k
    for k in ("clip", "n_policy", "agree", "n_query"):
        assert sums[k] == expected[k], k


@pytest.mark.parametrize("name", CASES)
def test_grpo_sd_loss_value_gradient_and_metrics_equal_the_fp64_oracle(name):
    c = _case(name)
    x = torch.tensor(c["logits"], dtype=D, requires_grad=True)
    loss, sums = _loss_fn(c)(x, _micro_batch(c))
    loss.backward()
    expected, expected_sums = grpo_sd_oracle(c["logits"], c)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    _check_sums(sums, expected_sums)
    grad = fd_gradient(lambda L: grpo_sd_oracle(L, c)[0], c["logits"])
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=D), rtol=1e-6, atol=1e-8)
    # the case exercises what its name says
    if name == "grpo_clipped":
        assert 0 < expected_sums["clip"] < N
    if name == "kl_clamped":
        d = [r - lp for r, lp in zip(c["ref"], c["old_at_base"])]
        assert any(math.exp(v) - v - 1 > c["kl_clamp"] for v in d) and any(math.exp(v) - v - 1 < c["kl_clamp"] for v in d)
    if c["sd"] is not None:
        assert expected_sums["jsd_sum"] > 0 and 1 <= expected_sums["agree"] < expected_sums["n_query"]
    _check_term_grad_norms(sums, c)


def _term_grad_sq(c):
    """The squared norms of the GRPO term's (surrogate + KL) and the SD term's gradients with respect to the
    logits, by finite differences of the oracle with and without its SD term."""
    pg_only = dict(c, sd=None)
    pg = fd_gradient(lambda L: grpo_sd_oracle(L, pg_only)[0], c["logits"])
    total = fd_gradient(lambda L: grpo_sd_oracle(L, c)[0], c["logits"])
    sq = lambda g: sum(v * v for row in g for v in row)
    return sq(pg), sq([[t - p for t, p in zip(tr, pr)] for tr, pr in zip(total, pg)])


def _check_term_grad_norms(sums, c):
    if c["sd"] is None:   # no SD term: nothing to balance, nothing measured
        assert sums["pg_grad_sq"] == sums["sd_grad_sq"] == 0.0
        return
    pg_sq, sd_sq = _term_grad_sq(c)
    assert pg_sq > 0 and sd_sq > 0
    assert sums["pg_grad_sq"] == pytest.approx(pg_sq, rel=1e-6)
    assert sums["sd_grad_sq"] == pytest.approx(sd_sq, rel=1e-6)


def test_the_oracle_itself_is_right_on_hand_values():
    """Two numbers worked by hand, so that the oracle is not merely self-consistent."""
    # One row, logits [0, log 3] -> probs [1/4, 3/4]; target 1, A = 2, old = log 3/4 (ratio 1): surrogate -2.
    c = dict(temperature=1.0, targets=[1], old=None, old_at_base=[math.log(0.75)], adv=[2.0], clip_eps=0.2,
             ref=[math.log(0.75) + math.log(2)], kl_coef=0.5, kl_clamp=10.0, sd=None, weights=[1.0])
    loss, sums = grpo_sd_oracle([[0.0, math.log(3)]], c)
    # k3 with d = log 2: 2 - log 2 - 1
    assert sums["kl_sum"] == pytest.approx(1 - math.log(2))
    assert loss == pytest.approx(-2 + 0.5 * (1 - math.log(2)))
    # JSD_0.5 between [1, 0] and [0, 1] limits to log 2; with probabilities [0.5, 0.5] vs [1/4, 3/4]:
    p, q = [0.5, 0.5], [0.25, 0.75]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    by_hand = 0.5 * sum(a * math.log(a / b) for a, b in zip(p, m)) + 0.5 * sum(a * math.log(a / b) for a, b in zip(q, m))
    assert jsd([0.0, 0.0], [0.0, math.log(3)], 0.5, 1.0) == pytest.approx(by_hand)
    assert clipped_forward_kl([0.0, 0.0], [0.0, math.log(3)], 0.1) == pytest.approx(
        min(0.5 * math.log(2), 0.1) + 0.5 * math.log(0.5 / 0.75))


def test_token_weights_follow_the_documented_normalisations():
    rows = torch.tensor([0, 0, 0, 1, 2, 2])
    seq_lens = torch.tensor([3, 1, 2])
    tok = token_weights(rows, seq_lens, "token", n_tokens=12, n_seqs=6, scale=2.0)
    assert tok.tolist() == pytest.approx([2 / 12] * 6)
    seq = token_weights(rows, seq_lens, "sequence", n_tokens=12, n_seqs=6, scale=2.0)
    assert seq.tolist() == pytest.approx([2 / (3 * 6)] * 3 + [2 / (1 * 6)] + [2 / (2 * 6)] * 2)


# ---------------------------------------------------------------------------------------------------
# OPSD (Search-E1): the clipped forward KL and its weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [10.0, 0.05])
def test_opsd_loss_equals_the_fp64_oracle(tau):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(N, V, generator=g, dtype=D) * 2).tolist()
    t = (torch.randn(N, V, generator=g, dtype=D) * 2).tolist()
    w = [0.1, 0.2, 0.3, 0.05, 0.15, 0.2]
    oracle = lambda L: sum(wi * clipped_forward_kl(t[i], L[i], tau) for i, wi in enumerate(w))
    x = torch.tensor(s, dtype=D, requires_grad=True)
    mb = SimpleNamespace(teacher_logits=lambda: torch.tensor(t, dtype=D), weights=torch.tensor(w, dtype=D))
    loss, sums = OPSDLoss(tau)(x, mb)
    loss.backward()
    assert loss.item() == pytest.approx(oracle(s), rel=1e-10)
    assert sums["kl_sum"] == pytest.approx(sum(clipped_forward_kl(t[i], s[i], tau) for i in range(N)), rel=1e-10)
    assert sums["n"] == N
    if tau < 1:  # the clip binds somewhere and not everywhere
        terms = [math.exp(a) * (a - b) for i in range(N) for a, b in zip(log_softmax(t[i]), log_softmax(s[i]))]
        assert any(v > tau for v in terms) and any(v < tau for v in terms)
    torch.testing.assert_close(x.grad, torch.tensor(fd_gradient(oracle, s), dtype=D), rtol=1e-6, atol=1e-8)


def test_group_advantages_and_the_sequence_surrogate_follow_their_formulas():
    from nemo_sdsearch.losses.grpo_sd_loss import token_weights
    from nemo_sdsearch.losses.policy import clipped_surrogate_per_token, group_advantages

    # A_i = (R_i - mean) / (unbiased std + eps), per group; eps large enough to show in the value
    r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    mean = 1 / 3
    std = math.sqrt(((1 - mean) ** 2 + 2 * mean ** 2) / 2)
    expected = [(x - mean) / (std + 0.1) for x in r[:3]] + [0.0, 0.0, 0.0]
    assert group_advantages(r, 3, eps=0.1).tolist() == pytest.approx(expected, rel=1e-6)
    assert group_advantages(r, 3, normalize_std=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rel=1e-6)
    # the training loss's surrogate with reduction "sequence" (as GRPOSDLoss forms it from token_weights):
    # per-sequence means, then the mean over sequences; the clip flags
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], dtype=D)
    old = logp - torch.tensor([[0.5, 0.05, -0.5], [0.1, -0.05, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0], dtype=D)
    rows, cols = mask.nonzero(as_tuple=True)
    per_token, clipped = clipped_surrogate_per_token(logp[rows, cols], old[rows, cols], adv[rows], 0.2)
    w = token_weights(rows, torch.bincount(rows), "sequence", n_tokens=5, n_seqs=2)
    loss = (per_token * w.to(D)).sum()
    per_tok = [[-min(math.exp(x) * a, min(max(math.exp(x), 0.8), 1.2) * a) for x in row]
               for row, a in zip([[0.5, 0.05, -0.5], [0.1, -0.05, 0.0]], [1.0, -2.0])]
    expected = ((per_tok[0][0] + per_tok[0][1]) / 2 + sum(per_tok[1]) / 3) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-7)   # the weights are fp32, as in training
    assert clipped.tolist() == [True, False, False, False, False]   # ratio e^0.5 > 1.2 with A > 0: clipped


def test_bf16_student_with_more_rows_than_vocabulary_gets_every_rows_gradient():
    """The chunked divergences scale a low-precision gradient chunk by chunk over the ROWS: with more rows than
    vocabulary entries (and more than one chunk) every row's gradient is still the fp64 oracle's (bf16 tolerance)."""
    from nemo_sdsearch.losses.divergences import clipped_forward_kl as ckl
    from nemo_sdsearch.losses.divergences import generalized_jsd

    g = torch.Generator().manual_seed(11)
    s = (torch.randn(9, 3, generator=g, dtype=D)).to(torch.bfloat16)
    t = (torch.randn(9, 3, generator=g, dtype=D)).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 9, dtype=D)
    s_list, t_list = s.double().tolist(), t.double().tolist()
    for fn, oracle in ((lambda x: generalized_jsd(x, t, 0.5, 1.0, chunk_rows=2), lambda L, i: jsd(t_list[i], L[i], 0.5, 1.0)),
                       (lambda x: ckl(x, t, 10.0, 1.0, chunk_rows=2), lambda L, i: clipped_forward_kl(t_list[i], L[i], 10.0))):
        x = s.clone().requires_grad_()
        (fn(x).double() * w).sum().backward()
        grad = fd_gradient(lambda L: sum(w[i].item() * oracle(L, i) for i in range(9)), s_list)
        torch.testing.assert_close(x.grad.double(), torch.tensor(grad, dtype=D), rtol=2e-2, atol=2e-3)
    # the log-probs' backward walks the rows chunk by chunk too
    from nemo_sdsearch.losses.vocab_parallel import token_logprobs

    targets = [0, 2, 1, 1, 0, 2, 2, 0, 1]
    x = s.double().clone().requires_grad_()
    (token_logprobs(x, torch.tensor(targets), 0.7, chunk_rows=2) * w).sum().backward()
    grad = fd_gradient(lambda L: sum(w[i].item() * log_softmax(L[i], 0.7)[targets[i]] for i in range(9)), s_list)
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=D), rtol=1e-6, atol=1e-8)


def test_opsd_counts_and_weights_follow_eq7_and_the_token_mean():
    from nemo_sdsearch.algorithms.opsd import opsd_counts

    # three pairs' policy masks; position 0 is never a target (a one-token prompt makes position 1 a target)
    masks = [[True, True, True, False], [False, False, True], [True, False, False]]
    assert opsd_counts(masks) == (2, 3)
    assert opsd_counts([[False, True], [True, False, False, False]]) == (1, 1)
    # trajectory (eq. 7): 1/|R_tau| within a pair, then the mean over the pairs that have positions
    traj = opsd_weights(masks, "trajectory", n_pairs=2, n_positions=3)
    assert traj.tolist() == pytest.approx([1 / (2 * 2), 1 / (2 * 2), 1 / (1 * 2)])
    assert opsd_weights(masks, "token", n_pairs=2, n_positions=3).tolist() == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------------------------------------------
# The vocab-parallel path (Megatron's tensor parallelism): the same oracle, the vocabulary in two shards
# ---------------------------------------------------------------------------------------------------
def _vocab_parallel_worker(rank, world, names):
    import torch.distributed as dist

    from nemo_sdsearch.losses.shard import VocabShard
    from nemo_sdsearch.losses.vocab_parallel import vocab_parallel_argmax

    dist.init_process_group("gloo")
    V_pad = 8  # V = 7 real columns + one of TP padding, holding garbage
    vocab_shard = VocabShard(V, rank * 4, (rank + 1) * 4, dist.group.WORLD)   # as MegatronActor passes it
    out = {}
    for name in names:
        c = _case(name)
        full = torch.full((N, V_pad), 50.0, dtype=D)
        full[:, :V] = torch.tensor(c["logits"], dtype=D)
        shard = full[:, rank * 4:(rank + 1) * 4].clone().requires_grad_()
        mb = _micro_batch(c)
        if c["teacher"] is not None:
            tfull = torch.full((len(c["teacher"]), V_pad), -30.0, dtype=D)
            tfull[:, :V] = torch.tensor(c["teacher"], dtype=D)
            mb.teacher_logits = tfull[:, rank * 4:(rank + 1) * 4].clone()
        loss, sums = _loss_fn(c, vocab_shard)(shard, mb)
        loss.backward()
        out[name] = (loss.item(), sums, shard.grad.tolist())
        # the global argmax (the agreement metric's), on its own: agreement compares two argmaxes, which would
        # hide an error both share
        out[name + "/argmax"] = vocab_parallel_argmax(shard.detach(), dist.group.WORLD, V).tolist()
        if name == "grpo_clipped":  # and the OPSD loss on the same shards
            t = torch.randn(N, V_pad, generator=torch.Generator().manual_seed(3), dtype=D)
            t[:, V:] = 80.0
            s2 = shard.detach().clone().requires_grad_()
            w = torch.linspace(0.1, 0.6, N, dtype=D)
            mb2 = SimpleNamespace(teacher_logits=t[:, rank * 4:(rank + 1) * 4].clone(), weights=w)
            l2, _ = OPSDLoss(0.05, vocab_shard)(s2, mb2)
            l2.backward()
            out["opsd"] = (l2.item(), t[:, :V].tolist(), w.tolist(), s2.grad.tolist())
    dist.destroy_process_group()
    return out


def test_vocab_parallel_loss_equals_the_fp64_oracle_shard_by_shard():
    from _mp import run_workers

    names = ["grpo_clipped", "kl_clamped", "sd", "sd_beta0"]
    ranks = run_workers(_vocab_parallel_worker, 2, names, timeout=300)
    maxima = []
    for name in names:
        c = _case(name)
        expected, expected_sums = grpo_sd_oracle(c["logits"], c)
        grad = fd_gradient(lambda L: grpo_sd_oracle(L, c)[0], c["logits"])
        full_grad = [r0 + r1 for r0, r1 in zip(ranks[0][name][2], ranks[1][name][2])]
        for rank in range(2):
            loss, sums, _ = ranks[rank][name]
            assert loss == pytest.approx(expected, rel=1e-10, abs=1e-12), (name, rank)
            _check_sums(sums, expected_sums)
            _check_term_grad_norms(sums, c)   # both shards' squares, summed over the TP group
        torch.testing.assert_close(torch.tensor(full_grad, dtype=D)[:, :V], torch.tensor(grad, dtype=D),
                                   rtol=1e-6, atol=1e-8)
        assert all(row[V] == 0.0 for row in full_grad), "no gradient into the padding column"
        argmax = [max(range(V), key=row.__getitem__) for row in c["logits"]]
        assert ranks[0][name + "/argmax"] == ranks[1][name + "/argmax"] == argmax
        maxima += argmax
    assert any(a >= 4 for a in maxima) and any(a < 4 for a in maxima)  # maxima on both ranks' shards
    loss, t, w, _ = ranks[0]["opsd"]
    s = _case("grpo_clipped")["logits"]
    oracle = lambda L: sum(wi * clipped_forward_kl(t[i], L[i], 0.05) for i, wi in enumerate(w))
    assert ranks[1]["opsd"][0] == loss == pytest.approx(oracle(s), rel=1e-10)
    full_grad = [a + b for a, b in zip(ranks[0]["opsd"][3], ranks[1]["opsd"][3])]
    torch.testing.assert_close(torch.tensor(full_grad, dtype=D)[:, :V], torch.tensor(fd_gradient(oracle, s), dtype=D),
                               rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# Positions: the recipe's micro-batches and the teachers' shifted positions, against plain forwards
# ---------------------------------------------------------------------------------------------------
QUESTIONS = [("q0", "who wrote the song about the river?", "alma"), ("q1", "which city hosts the old bridge?", "tarn")]
# (turn texts, information text after the turn); two rollouts per question, one right and one wrong
ROLLOUTS = {
    "q0": [[("<think> find the song </think> <search> song about the river </search>", "Doc 1 alma wrote it"),
            ("<answer> alma </answer>", None)],
           [("<search> river song writer </search>", "Doc 1 nothing here"),
            ("<search> the river </search>", "Doc 1 still nothing"), ("<answer> bob </answer>", None)]],
    "q1": [[("<search> old bridge city </search>", "Doc 1 the bridge is in tarn"), ("<answer> tarn </answer>", None)],
           [("<think> guess </think> <answer> paris </answer>", None)]],
}


@pytest.fixture(scope="module")
def lm(micro_model_dir):
    """The warm-started micro model (fp32) and its tokenizer, read from disk: tests train copies of it."""
    from nemo_sdsearch.models.hf import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer(micro_model_dir[0], device="cpu", training=True)


def _trajectories(tok):
    from nemo_sdsearch.core.prompts import information_block, prompt_format
    from nemo_sdsearch.core.trajectory import Trajectory

    prompts = prompt_format(tok, "default", "none")
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
    trajs = []
    for qid, question, gold in QUESTIONS:
        for turns in ROLLOUTS[qid]:
            t = Trajectory.start(qid, question, [gold], encode(prompts.student(question)))
            for k, (text, info) in enumerate(turns):
                # the last turn ends in the EOS the policy sampled, as the engine records it
                ids = encode(" " + text) + ([tok.eos_token_id] if k == len(turns) - 1 else [])
                t.add_policy(ids, [-1.0] * len(ids), decode)
                if "<search>" in text:
                    t.queries.append(text.split("<search>")[1].split("</search>")[0].strip())
                if info:
                    t.add_environment(encode(information_block([f'"Doc"\n{info}'])))
            t.finalize()
            trajs.append(t)
    assert [t.exact_match for t in trajs] == [1.0, 0.0, 1.0, 0.0]
    assert all(any(t.query_mask()) for t in trajs[:3]) and not any(trajs[3].query_mask())
    return trajs, prompts, encode


def _cfg(**overrides):
    from nemo_sdsearch.config import load_config

    base = {"rollout.group_size": 2, "rollout.temperature": 1.0, "grpo.micro_batch_size": 3, "grpo.kl_coef": 0.0,
            "optim.lr": 1e-4, "optim.grad_clip": 0.0, "sd.coef": 1.0}
    base.update(overrides)
    return load_config("tiny_cpu", [f"{k}={v}" for k, v in base.items()])


def _actor(model, lr=1e-4):
    from nemo_sdsearch.models.hf import HFActor

    return HFActor(copy.deepcopy(model), lr=lr, grad_clip=0.0)


def _forward(model, ids):
    """Plain full-sequence logits [T, V] of one unpadded sequence (no project code)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def _teacher(trajs, prompts, encode, cfg):
    from nemo_sdsearch.algorithms import sd_search

    blocks = sd_search.rollout_hindsight_blocks(trajs, 2, cfg.sd, lambda s: len(encode(s)))
    return sd_search.teacher_sequences(trajs, blocks, lambda q, b: encode(prompts.teacher(q, b)))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_recipe_micro_batches_carry_the_right_tokens_advantages_and_teacher_positions(lm, reduction):
    """`policy_micro_batches` (the recipe's assembly) against each trajectory's own masks and plain forwards:
    the targets are the sampled tokens, each position carries its rollout's advantage, the query flags are
    the rollout's query mask, the weights sum to one, the student logits at column j are the model's
    prediction of token j (from j - 1), and the teacher logits are the prediction of the SAME token in the
    teacher sequence (column j + shift)."""
    from nemo_sdsearch.algorithms.grpo import policy_micro_batches

    t_start = time.perf_counter()
    model, tok = lm
    trajs, prompts, encode = _trajectories(tok)
    cfg = _cfg(algorithm="sd_search", **{"grpo.reduction": reduction})
    teacher = _teacher(trajs, prompts, encode, cfg)
    assert all(t.shift > 0 for t in teacher)
    actor = _actor(model)
    n_scored = [sum(1 for j, p in enumerate(t.policy_mask()) if p and j > 0) for t in trajs]
    adv = torch.tensor([0.7, -0.7, 0.4, -0.4])
    timer = {"teacher_s": 0.0}
    (mbs,) = policy_micro_batches(actor, None, trajs, adv, teacher, cfg, tok.pad_token_id, timer)
    assert len(mbs) == 2  # micro-batches of 3 and 1: padding in the first
    seen, total_weight, first = set(), 0.0, 0
    for mb in mbs:
        mi = list(range(first, first + mb.batch.shape[0]))
        first += len(mi)
        rows, cols = mb.rows.tolist(), mb.cols.tolist()
        student = actor.logits_at(mb.batch, mb.rows, mb.cols).double()
        teacher_logits = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
        k_query = 0
        for k, (r, j) in enumerate(zip(rows, cols)):
            t = trajs[mi[r]]
            seen.add((mi[r], j))
            assert mb.targets[k].item() == t.token_ids[j]
            assert mb.advantages[k].item() == pytest.approx(adv[mi[r]].item())
            assert bool(mb.is_query[k]) == t.query_mask()[j]
            total_weight += mb.token_weights[k].item()
            # token: 1 / (all scored positions); sequence: 1 / (the rollout's positions * rollouts)
            expected_w = 1 / sum(n_scored) if reduction == "token" else 1 / (n_scored[mi[r]] * len(trajs))
            assert mb.token_weights[k].item() == pytest.approx(expected_w)
            torch.testing.assert_close(student[k], _forward(model, t.token_ids)[j - 1], rtol=1e-4, atol=1e-4)
            if t.query_mask()[j]:
                ts = teacher[mi[r]]
                assert ts.token_ids[j + ts.shift] == t.token_ids[j]
                torch.testing.assert_close(teacher_logits[k_query].double(), _forward(model, ts.token_ids)[j + ts.shift - 1],
                                           rtol=1e-4, atol=1e-4)
                k_query += 1
        assert k_query == (0 if teacher_logits is None else teacher_logits.shape[0])
    expected = {(i, j) for i, t in enumerate(trajs) for j, p in enumerate(t.policy_mask()) if p and j > 0}
    assert seen == expected
    assert 0 < timer["teacher_s"] < time.perf_counter() - t_start  # the teacher passes, timed
    assert total_weight == pytest.approx(1.0)


def test_a_teacher_sequence_past_the_models_positions_gets_no_jsd_term(lm):
    """The context-length guard: a rollout plus its hindsight block can pass max_position_embeddings (tiny_cpu:
    1,024-token rollouts + a 256-token block, 1,024 positions). Its teacher sequence is dropped (None), its
    query positions leave the JSD (flags off, not counted in n_query), the other rollouts keep theirs and their
    teacher logits; at config time the budgets say so (a warning), and a rollout budget past the positions is
    refused."""
    import warnings

    from nemo_sdsearch.algorithms import sd_search
    from nemo_sdsearch.algorithms.grpo import policy_micro_batches
    from nemo_sdsearch.config import ConfigError, ConfigWarning

    model, tok = lm
    trajs, prompts, encode = _trajectories(tok)
    cfg = _cfg(algorithm="sd_search")
    blocks = sd_search.rollout_hindsight_blocks(trajs, 2, cfg.sd, lambda s: len(encode(s)))
    ids = lambda q, b: encode(prompts.teacher(q, b))  # noqa: E731
    full = sd_search.teacher_sequences(trajs, blocks, ids)
    lengths = [len(t.token_ids) for t in full]
    limit = sorted(lengths)[-1] - 1               # the longest teacher sequence is one token too long
    teacher = sd_search.teacher_sequences(trajs, blocks, ids, max_positions=limit)
    dropped = [i for i, t in enumerate(teacher) if t is None]
    assert dropped == [lengths.index(max(lengths))] and any(trajs[dropped[0]].query_mask())
    assert all(t.token_ids == f.token_ids for t, f in zip(teacher, full) if t is not None)
    actor = _actor(model)
    adv = torch.tensor([0.7, -0.7, 0.4, -0.4])
    (mbs,) = policy_micro_batches(actor, None, trajs, adv, teacher, cfg, tok.pad_token_id, {"teacher_s": 0.0})
    (ref,) = policy_micro_batches(actor, None, trajs, adv, full, cfg, tok.pad_token_id, {"teacher_s": 0.0})
    first = 0
    for mb, full_mb in zip(mbs, ref):
        mi = list(range(first, first + mb.batch.shape[0]))
        first += len(mi)
        rows = mb.rows.tolist()
        for k, r in enumerate(rows):
            assert bool(mb.is_query[k]) == (bool(full_mb.is_query[k]) and mi[r] not in dropped)
        n_q = int(mb.is_query.sum())
        logits = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
        assert (0 if logits is None else logits.shape[0]) == n_q
        if n_q:  # the kept rollouts' teacher logits are the ones they had
            keep = mb.is_query[full_mb.is_query]
            torch.testing.assert_close(logits, full_mb.teacher_logits()[keep])
    n_query = sum(int(mb.is_query.sum()) for mb in mbs)
    assert n_query == sum(int(mb.is_query.sum()) for mb in ref) - sum(trajs[dropped[0]].query_mask()[1:])
    assert all(mb.query_weight == pytest.approx(1 / n_query) for mb in mbs)
    # config time: the tiny model's 1,024 positions against the budgets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cfg(algorithm="sd_search")
        _cfg(algorithm="sd_search", **{"sd.max_hindsight_tokens": 64, "rollout.max_context": 960})
    assert [str(w.message).split(" (")[0] for w in caught if w.category is ConfigWarning] == ["SD-Search's teacher sequence"]
    with pytest.raises(ConfigError, match="exceeds the model's 1024 positions"):
        _cfg(**{"rollout.max_context": 1025})


def test_hf_actor_skips_a_step_with_a_non_finite_loss_or_gradient(lm):
    model, _ = lm
    actor = _actor(model)
    before = [p.detach().clone() for p in actor.model.parameters()]
    x = next(actor.model.parameters())
    # a NaN loss, an infinite loss, and a finite loss (0) whose gradient is infinite (d sqrt(u)/du at u = 0)
    for loss_of in (lambda: x.sum() * float("nan"), lambda: x.sum() * float("inf"), lambda: (x - x.detach()).sqrt().sum()):
        out = actor.train_step(lambda i: loss_of(), 1)
        assert out["skipped"] is True, out
        assert all(torch.equal(a, b) for a, b in zip(before, actor.model.parameters()))
    out = actor.train_step(lambda i: x.sum(), 1)
    assert out["skipped"] is False and out["grad_norm"] > 0
    assert not torch.equal(before[0], x.detach())


def _pool_and_pairs(trajs):
    from nemo_sdsearch.algorithms.search_e1 import pool_records
    from nemo_sdsearch.core.pairs import mine_pairs

    pool = [trajs[0:2], trajs[2:4]]
    pairs, _ = mine_pairs([pool_records(g) for g in pool])
    assert [(p.reference, p.student) for p in pairs] == [(0, 1), (0, 1)]
    return pool, pairs


def _opsd_items(tok, pool, pairs, cfg, max_positions=None):
    """Search-E1's (student ids, teacher ids, shift, policy mask) per pair, as the round builds them."""
    from nemo_sdsearch.algorithms.search_e1 import opsd_items
    from nemo_sdsearch.core.prompts import prompt_format

    prompts, encode = prompt_format(tok, "default", "none"), lambda s: tok.encode(s, add_special_tokens=False)
    return opsd_items(pool, pairs, lambda ids: tok.decode(ids, skip_special_tokens=False),
                      lambda q, b: encode(prompts.teacher(q, b)), cfg.search_e1, max_positions=max_positions)


def test_opsd_pairs_past_the_models_positions_are_left_out(lm):
    """Search-E1's context-length guard: a pair whose teacher sequence (the student's rollout after a prompt with
    the reference) passes max_position_embeddings is left out of the round; the others are the same items; no
    pair left is refused with the budgets to lower. The budgets are checked at config time (a warning)."""
    import warnings

    from nemo_sdsearch.config import ConfigWarning

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    pool, pairs = _pool_and_pairs(trajs)
    cfg = _cfg(algorithm="search_e1")
    full = _opsd_items(tok, pool, pairs, cfg)
    lengths = [len(it[1]) for it in full]
    assert len(set(lengths)) == 2
    kept = _opsd_items(tok, pool, pairs, cfg, max_positions=max(lengths) - 1)
    assert kept == [it for it in full if len(it[1]) < max(lengths)] and len(kept) == 1
    assert _opsd_items(tok, pool, pairs, cfg, max_positions=max(lengths)) == full
    with pytest.raises(ValueError, match="max_reference_tokens"):
        _opsd_items(tok, pool, pairs, cfg, max_positions=min(lengths) - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cfg(algorithm="search_e1")                                            # 1,024 + 384 > 1,024
        _cfg(algorithm="search_e1", **{"search_e1.max_reference_tokens": 64, "rollout.max_context": 960})
    assert [str(w.message).split(" (")[0] for w in caught if w.category is ConfigWarning] == ["Search-E1's teacher sequence"]


def _opsd_oracle_terms(student_model, teacher_model, items, tau):
    """Per scored position: sum_v min(p log(p/q), tau) with q the student's prediction of token j in the
    student sequence and p the teacher's prediction of the same token in the teacher sequence."""
    out = []
    for stu_ids, tea_ids, shift, mask in items:
        s_logits, t_logits = _forward(student_model, stu_ids), _forward(teacher_model, tea_ids)
        for j, m in enumerate(mask):
            if m and j > 0:
                assert tea_ids[j + shift] == stu_ids[j]
                out.append(clipped_forward_kl(t_logits[j + shift - 1].tolist(), s_logits[j - 1].tolist(), tau))
    return out


def test_search_e1_lora_teacher_reads_the_same_token_through_its_longer_prompt(lm):
    """Search-E1's LoRA OPSD terms (`opsd_items` + the one step's `opsd_micro_batches` and `OPSDLoss`, the actor in
    adapter mode): the student is the adapted model on the student prompt, the teacher the model with the adapter
    off (`adapter_off()`) on the teacher prompt (reference trajectory included), both at the same response token."""
    from nemo_sdsearch.algorithms.opsd import opsd_micro_batches
    from nemo_sdsearch.algorithms.search_e1 import add_lora

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    cfg = _cfg(algorithm="search_e1")
    pool, pairs = _pool_and_pairs(trajs)
    items = _opsd_items(tok, pool, pairs, cfg)
    assert all(shift > 0 for _, _, shift, _ in items)
    base = copy.deepcopy(model)
    actor = _actor(model)
    actor.enable_adapter(lambda m: add_lora(m, cfg))
    with torch.no_grad():  # a non-zero adapter, so that "adapter on" and "adapter off" differ
        g = torch.Generator().manual_seed(1)
        for name, p in actor.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    n_pos = sum(sum(x[3][1:]) for x in items)
    mbs = opsd_micro_batches(items, actor, actor.adapter_off(), tok.pad_token_id, 2,
                             lambda ms: opsd_weights(ms, "token", len(items), n_pos))
    tau = 0.5
    with torch.no_grad():
        terms = torch.cat([actor.vocab_shard.clipped_forward_kl(actor.logits_at(mb.batch, mb.rows, mb.cols),
                                                                mb.teacher_logits(), tau) for mb in mbs])
        loss = sum(OPSDLoss(tau)(actor.logits_at(mb.batch, mb.rows, mb.cols), mb)[0] for mb in mbs)
    expected = _opsd_oracle_terms(actor.model, base, items, tau)   # (actor.model: the adapter on)
    torch.testing.assert_close(terms.double(), torch.tensor(expected, dtype=D), rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(sum(expected) / n_pos, rel=1e-4)


def test_full_parameter_opsd_teacher_reads_the_same_token_through_its_longer_prompt(lm):
    from nemo_sdsearch.algorithms.opsd import opsd_micro_batches

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    cfg = _cfg(algorithm="search_e1")
    pool, pairs = _pool_and_pairs(trajs)
    items = _opsd_items(tok, pool, pairs, cfg)
    student, teacher = _actor(model), _actor(model)
    with torch.no_grad():  # the student has moved away from the frozen teacher
        for p in student.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    n_pos = sum(sum(x[3][1:]) for x in items)
    mbs = opsd_micro_batches(items, student, teacher, tok.pad_token_id, 2,
                             lambda ms: opsd_weights(ms, "token", len(items), n_pos))
    tau = 0.5
    with torch.no_grad():
        loss = sum(OPSDLoss(tau)(student.logits_at(mb.batch, mb.rows, mb.cols), mb)[0] for mb in mbs)
    expected = _opsd_oracle_terms(student.model, teacher.model, items, tau)
    assert len(expected) == n_pos
    assert loss.item() == pytest.approx(sum(expected) / n_pos, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# Direction: one real update moves the model the way the objective says
# ---------------------------------------------------------------------------------------------------
def _policy_logprob(model, t):
    """Sum of log pi(token) over a trajectory's policy positions (plain forward, temperature 1)."""
    lp = torch.log_softmax(_forward(model, t.token_ids), -1)
    return sum(lp[j - 1, t.token_ids[j]].item() for j, m in enumerate(t.policy_mask()) if m and j > 0)


def _update(actor, ref, trajs, adv, teacher, cfg, tok):
    from nemo_sdsearch.algorithms.grpo import update_policy

    m, stats = update_policy(actor, ref, trajs, torch.tensor(adv), teacher, cfg, tok.pad_token_id)
    assert len(stats) == 1 and not stats[0]["skipped"] and math.isfinite(stats[0]["grad_norm"])
    return m


@pytest.mark.parametrize("adv", [(1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)])
def test_grpo_update_raises_positive_and_lowers_negative_advantage_rollouts(lm, adv):
    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    actor = _actor(model)
    before = [_policy_logprob(actor.model, t) for t in trajs]
    _update(actor, None, trajs, adv, None, _cfg(algorithm="grpo"), tok)
    after = [_policy_logprob(actor.model, t) for t in trajs]
    for i, a in enumerate(adv):
        if a > 0:
            assert after[i] > before[i] + 1e-4, (i, before[i], after[i])
        elif a < 0:
            assert after[i] < before[i] - 1e-4, (i, before[i], after[i])


def test_grpo_update_separates_the_right_rollout_from_the_wrong_one(lm):
    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    actor = _actor(model)
    gap = lambda: _policy_logprob(actor.model, trajs[0]) - _policy_logprob(actor.model, trajs[1])
    before = gap()
    _update(actor, None, trajs, (1.0, -1.0, 0.0, 0.0), None, _cfg(algorithm="grpo"), tok)
    assert gap() > before + 1e-4


def _k3_to(actor_model, ref_model, trajs):
    """Mean over the batch's policy tokens of k3 = exp(d) - d - 1, d = log pi_ref - log pi (KL(pi || ref) >= 0)."""
    vals = []
    for t in trajs:
        lp = torch.log_softmax(_forward(actor_model, t.token_ids), -1)
        lr = torch.log_softmax(_forward(ref_model, t.token_ids), -1)
        for j, m in enumerate(t.policy_mask()):
            if m and j > 0:
                d = (lr[j - 1, t.token_ids[j]] - lp[j - 1, t.token_ids[j]]).item()
                vals.append(math.exp(d) - d - 1)
    return sum(vals) / len(vals)


def test_kl_term_pulls_the_policy_toward_the_reference(lm):
    from nemo_sdsearch.models.hf import HFScorer

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    actor = _actor(model)
    before = _k3_to(actor.model, ref_model, trajs)
    assert before > 1e-3
    m = _update(actor, HFScorer(ref_model), trajs, (0.0, 0.0, 0.0, 0.0), None,
                _cfg(algorithm="grpo", **{"grpo.kl_coef": 1.0}), tok)
    assert m["kl_sum"] > 0
    assert _k3_to(actor.model, ref_model, trajs) < before - 1e-5


def _jsd_to_fixed_teacher(model, trajs, teacher_logits_by_pos, cfg):
    total = 0.0
    for (i, j), t_row in teacher_logits_by_pos.items():
        s_row = _forward(model, trajs[i].token_ids)[j - 1].tolist()
        total += jsd(t_row, s_row, cfg.sd.beta, cfg.sd.temperature)
    return total / len(teacher_logits_by_pos)


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_sd_search_update_lowers_the_jsd_to_the_hindsight_teacher_at_query_positions(lm, beta):
    """Zero advantages and no KL: the update is the JSD term alone; after it the student at the query
    positions is closer to the (pre-update, stop-gradient) teacher that read the hindsight block."""
    model, tok = lm
    trajs, prompts, encode = _trajectories(tok)
    cfg = _cfg(algorithm="sd_search", **{"sd.beta": beta})
    teacher = _teacher(trajs, prompts, encode, cfg)
    fixed = {}
    for i, (t, ts) in enumerate(zip(trajs, teacher)):
        logits = _forward(model, ts.token_ids)
        for j, q in enumerate(t.query_mask()):
            if q:
                fixed[(i, j)] = logits[j + ts.shift - 1].tolist()
    actor = _actor(model)
    before = _jsd_to_fixed_teacher(actor.model, trajs, fixed, cfg)
    m = _update(actor, None, trajs, (0.0, 0.0, 0.0, 0.0), teacher, cfg, tok)
    assert m["n_query"] == len(fixed) and m["jsd_sum"] / m["n_query"] == pytest.approx(before, rel=2e-3)
    assert _jsd_to_fixed_teacher(actor.model, trajs, fixed, cfg) < before * (1 - 1e-4)


def test_full_parameter_opsd_step_lowers_the_clipped_kl_to_the_teacher(lm):
    from nemo_sdsearch.algorithms.opsd import opsd_step

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    cfg = _cfg(algorithm="search_e1", **{"search_e1.adapter": "full"})
    pool, pairs = _pool_and_pairs(trajs)
    items = _opsd_items(tok, pool, pairs, cfg)
    student, teacher = _actor(model), _actor(model)
    tau = cfg.search_e1.tau_clip
    before = sum(_opsd_oracle_terms(student.model, teacher.model, items, tau))
    out = opsd_step(student, teacher, items, cfg.search_e1, tok.pad_token_id)
    assert not out["skipped"] and out["loss"] > 0
    assert sum(_opsd_oracle_terms(student.model, teacher.model, items, tau)) < before * (1 - 1e-4)


def test_search_e1_lora_round_lowers_its_own_loss_on_the_same_pairs(lm, tmp_path, monkeypatch):
    """The real LoRA OPSD round (`opsd_round`, search_e1.adapter=lora, over the run's components), two steps on a
    batch holding every pair: each step is the one OPSD step (`opsd.opsd_step`) of the actor in adapter mode toward
    its own adapter-off teacher; the loss it logs at step 2 (after one update) is below the loss at step 1 (before
    any); the round ends with the adapter merged, the actor holding the weights it wrote to out/merged."""
    import json
    from dataclasses import replace

    from rich.console import Console
    from safetensors.torch import load_file

    from nemo_sdsearch.algorithms import opsd
    from nemo_sdsearch.algorithms.search_e1 import opsd_round
    from nemo_sdsearch.algorithms.setup import build_components, close_components

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    cfg = _cfg(algorithm="search_e1", **{"search_e1.opsd_steps": 2, "search_e1.opsd_eval_every": 0,
                                          "search_e1.opsd_pairs_per_step": 8, "search_e1.opsd_lr": 1e-5,
                                          "rollout.max_turns": 1, "rollout.max_new_tokens": 8,
                                          "model.device": "cpu", "model.threads": 1})
    assert cfg.search_e1.adapter == "lora"
    pool, pairs = _pool_and_pairs(trajs)
    # the warm start barely reads its context (a KL of ~5e-5 between the two prompts): perturbed weights make the
    # teacher's longer prompt matter, so that a wrong sequence, shift or prompt shows in the loss
    model = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    c = build_components(replace(cfg, model=replace(cfg.model, path=str(model_dir))), with_reference=False)
    c = c._replace(data={**c.data, "dev": c.data["dev"][:1]})
    base = {k: v.clone() for k, v in c.actor.export_weights().items()}
    steps = []
    real_step = opsd.opsd_step

    def spy(actor, teacher, batch, e1, pad_id):
        # the actor itself, in adapter mode, toward its own model with the adapter off; the base weights frozen
        assert actor is c.actor and actor.peft is not None and teacher.actor is actor
        assert all(not p.requires_grad for n, p in actor.model.named_parameters() if "lora_" not in n)
        steps.append(len(batch))
        return real_step(actor, teacher, batch, e1, pad_id)

    monkeypatch.setattr(opsd, "opsd_step", spy)
    out = tmp_path / "cycle_1" / "opsd"  # (the round makes its directory, parents included)
    result = opsd_round(cfg, c, pool, pairs, out, Console(quiet=True), rank0=True)
    close_components(c)
    assert steps == [len(pairs)] * 2 and result["best_step"] == 0
    rows = [json.loads(line) for line in (out / "opsd_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert 0 < rows[1]["loss"] < rows[0]["loss"] * (1 - 1e-4)
    merged = load_file(out / "merged" / "model.safetensors")  # what the next stage's loaders read
    # the round kept its start (no dev evaluation beat it): the adapter of step 0, zero, merged: the start weights
    assert c.actor.peft is None and all(p.requires_grad for p in c.actor.model.parameters())
    now = c.actor.export_weights()
    assert all(torch.equal(merged[k], now[k]) and torch.equal(now[k], base[k]) for k in merged)
    # step 1 runs before any update (the adapter starts at zero): its loss is eq. 7 on the base model
    items = _opsd_items(tok, pool, pairs, cfg)
    per_pair = [_opsd_oracle_terms(model, model, [it], cfg.search_e1.tau_clip) for it in items]
    eq7 = sum(sum(terms) / len(terms) for terms in per_pair) / len(per_pair)
    assert rows[0]["loss"] == pytest.approx(eq7, rel=1e-3)


def test_an_idle_replica_still_runs_one_micro_batch_at_weight_zero(lm):
    """Fewer pairs than data-parallel replicas: replica 1 of 2 has no pair of its own. It must still run one
    micro-batch (so that it takes part in the step's collectives, as every rank must) and contribute nothing."""
    from nemo_sdsearch.algorithms.opsd import opsd_step
    from nemo_sdsearch.models.hf import HFActor

    class SecondReplica(HFActor):  # the real HF actor seen as replica 1 of 2 (the other replica adds nothing)
        dp_size, dp_rank = 2, 1

    model, tok = lm
    trajs, _, _ = _trajectories(tok)
    cfg = _cfg(algorithm="search_e1", **{"search_e1.adapter": "full"})
    pool, pairs = _pool_and_pairs(trajs)
    items = _opsd_items(tok, pool, pairs, cfg)
    actor, teacher = SecondReplica(copy.deepcopy(model), lr=1e-3, grad_clip=0.0), _actor(model)
    seen = []
    real_train_on = actor.train_on
    actor.train_on = lambda mbs, fn: (seen.append(mbs), real_train_on(mbs, fn))[1]
    before = [p.detach().clone() for p in actor.model.parameters()]
    out = opsd_step(actor, teacher, items[:1], cfg.search_e1, tok.pad_token_id)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].weights.numel() > 0
    assert float(seen[0][0].weights.abs().sum()) == 0.0
    assert out["loss"] == 0.0 and not out["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, actor.model.parameters()))
