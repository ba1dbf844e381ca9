"""`VocabShard`: the single-device instance (dense implementations) and a 2-process gloo shard (vocab-parallel
kernels) give the same values and gradients for every method, on random fp64 logits whose TP padding columns
hold garbage; and `compile` (`sd.compile`) is honoured on the vocab-parallel path.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nemo_sdsearch.losses.shard import SingleDeviceVocab, VocabShard
from nemo_sdsearch.losses.vocab_parallel import shard_logits

D = torch.float64
ROWS = 7
TP = 2
# (real vocab, padded vocab): rank 1 holds 2 real columns and 3 of padding; rank 1 holds no real column
CASES = ((7, 10), (3, 8))
JSD = ((0.0, 1.0), (0.5, 1.3), (1.0, 0.7), (0.3, 2.0))   # (beta, T)
CLIPPED = ((0.02, 1.0), (0.05, 1.5), (1e9, 1.0))          # (tau, T): the clip active, and not


def _data(vocab: int, v_pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 3
    t = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 3
    t[::2] = s[::2] + torch.randn(len(s[::2]), v_pad, generator=g, dtype=D) * 0.3
    s[0, :vocab] = 1.0                     # all tied: argmax is the first id
    s[1, :vocab] = 0.0
    s[1, vocab - 1] = s[1, 0] = 2.0        # a tie across the shards (at (7, 10): ids 0 and 6)
    s[:, vocab:] = 1e4                     # TP padding: must never win, nor enter the softmax
    t[:, vocab:] = -3e4
    targets = torch.randint(0, vocab, (ROWS,), generator=g)
    targets[:2] = torch.tensor([0, vocab - 1])
    w = torch.rand(ROWS, generator=g, dtype=D) + 0.5
    return s, t, targets, w


def _ops(targets):
    """name -> (differentiable?, fn(shard, student, teacher)): every method of a VocabShard."""
    ops = {"logprobs": (True, lambda sh, s, t: sh.logprobs(s, targets, 1.7, chunk_rows=3)),
           "entropy": (False, lambda sh, s, t: sh.entropy(s, 0.7, chunk_rows=3)),
           "argmax": (False, lambda sh, s, t: sh.argmax(s))}
    for beta, temp in JSD:
        ops[f"jsd-{beta}-{temp}"] = (True, lambda sh, s, t, beta=beta, temp=temp: sh.jsd(s, t, beta, temp,
                                                                                        chunk_rows=3))
    for tau, temp in CLIPPED:
        ops[f"clipped-{tau}-{temp}"] = (True, lambda sh, s, t, tau=tau, temp=temp: sh.clipped_forward_kl(
            s, t, tau, temp, chunk_rows=3))
    ops["jsd-inplace"] = (True, lambda sh, s, t: sh.jsd(s.clone(), t, 0.5, 1.0, inplace_grad=True))
    return ops


def _run(shard: VocabShard, s: torch.Tensor, t: torch.Tensor, targets, w) -> dict:
    """Every method's value (and its weighted sum's gradient w.r.t. `s`, for the differentiable ones)."""
    out = {}
    for name, (diff, fn) in _ops(targets).items():
        x = s.clone().requires_grad_(diff)
        teacher = t.clone().requires_grad_(diff)   # the teacher is under stop-gradient
        value = fn(shard, x, teacher)
        grad = None
        if diff:
            (value * w).sum().backward()
            grad = x.grad
            assert teacher.grad is None, name
        out[name] = (value.detach(), grad)
    return out


def _worker(rank, world):
    dist.init_process_group("gloo")
    try:
        res = []
        for vocab, v_pad in CASES:
            s, t, targets, w = _data(vocab, v_pad)
            shard = VocabShard.of_rank(dist.group.WORLD, vocab, v_pad)
            vp = v_pad // world
            assert (shard.start, shard.end, shard.group) == (rank * vp, (rank + 1) * vp, dist.group.WORLD)
            r = _run(shard, shard_logits(s, rank, world), shard_logits(t, rank, world), targets, w)
            sq = shard.sum_over_shards(torch.tensor([float(rank + 1)], dtype=D))
            res.append((r, sq))
        return res
    finally:
        dist.destroy_process_group()


def test_single_device_and_two_gloo_shards_agree_on_every_method():
    from _mp import run_workers

    ranks = run_workers(_worker, TP, timeout=300)
    for ci, (vocab, v_pad) in enumerate(CASES):
        s, t, targets, w = _data(vocab, v_pad)
        single = VocabShard.single(vocab)
        assert isinstance(single, SingleDeviceVocab) and single.group is None
        dense = _run(single, s, t, targets, w)       # the padded logits: the single device cuts the padding
        assert set(dense) == set(ranks[0][ci][0])
        for name, (value, grad) in dense.items():
            for r in range(TP):
                v_r, g_r = ranks[r][ci][0][name]
                what = f"vocab {vocab}/{v_pad} {name} rank {r}"
                assert v_r.dtype == value.dtype, what
                if name == "argmax":
                    assert torch.equal(v_r, value), what
                else:
                    torch.testing.assert_close(v_r, value, rtol=1e-12, atol=1e-12, msg=what)
            if grad is None:
                continue
            assert torch.all(grad[:, vocab:] == 0), f"{name}: gradient into the padding (single device)"
            full = torch.cat([ranks[r][ci][0][name][1] for r in range(TP)], -1)
            assert torch.all(full[:, vocab:] == 0), f"{name}: gradient into the padding (shards)"
            torch.testing.assert_close(full, grad, rtol=1e-10, atol=1e-12, msg=f"{name} gradient")
        assert dense["argmax"][0][:2].tolist() == [0, 0]      # ties: the first id, across the shards too
        for r in range(TP):
            assert ranks[r][ci][1].item() == 3.0               # sum_over_shards: 1 + 2
        assert single.sum_over_shards(torch.tensor([5.0])).item() == 5.0
        # the clip binds in the first clipped case and not in the last
        terms = lambda x: torch.softmax(t[:, :vocab], -1) * (torch.log_softmax(t[:, :vocab], -1)
                                                             - torch.log_softmax(x[:, :vocab], -1))
        assert bool((terms(s) > CLIPPED[0][0]).any())


def test_single_device_cuts_the_padding_and_equals_the_dense_functions():
    from nemo_sdsearch.losses.divergences import clipped_forward_kl, generalized_jsd
    from nemo_sdsearch.losses.vocab_parallel import token_logprobs

    vocab, v_pad = 7, 10
    s, t, targets, _ = _data(vocab, v_pad)
    single, every = VocabShard.single(vocab), VocabShard.single()
    real_s, real_t = s[:, :vocab].contiguous(), t[:, :vocab].contiguous()
    for sh, (a, b) in ((single, (s, t)), (single, (real_s, real_t)), (every, (real_s, real_t))):
        assert torch.equal(sh.logprobs(a, targets, 1.3), token_logprobs(real_s, targets, 1.3))
        assert torch.equal(sh.jsd(a, b, 0.5, 1.3, 4), generalized_jsd(real_s, real_t, 0.5, 1.3, 4))
        assert torch.equal(sh.clipped_forward_kl(a, b, 0.1), clipped_forward_kl(real_s, real_t, 0.1))
        assert torch.equal(sh.argmax(a), real_s.argmax(-1))
        lsm = torch.log_softmax(real_s, -1)
        assert torch.equal(sh.entropy(a), -(lsm.exp() * lsm).sum(-1))
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        VocabShard.single(11).argmax(s)


def test_bad_shards_are_refused():
    with pytest.raises(ValueError, match="single"):
        VocabShard()
    with pytest.raises(ValueError, match="bad vocabulary shard"):
        VocabShard(7, 5, 5)
    with pytest.raises(ValueError, match="single-device"):
        SingleDeviceVocab(7, 0, 10)
    shard = VocabShard(7, 0, 8)            # one process: columns [0, 8)
    with pytest.raises(ValueError, match=r"not \[rows, 8\]"):
        shard.argmax(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="rank 0's shard of 1"):
        VocabShard(7, 4, 8).argmax(torch.zeros(2, 4))   # rank 1's columns in a group of one
    with pytest.raises(ValueError, match="does not split"):
        VocabShard.of_rank(None, 9, 8)
    assert VocabShard.of_rank(None, 7, 8) == shard


@pytest.mark.slow
def test_compile_is_honoured_on_the_vocab_parallel_path():
    """`sd.compile` on a tensor-parallel actor: the vocab-parallel chunks run torch.compile'd (not silently
    eager), with the eager values and gradients."""
    from types import SimpleNamespace

    from nemo_sdsearch.losses import divergences, vocab_parallel
    from nemo_sdsearch.losses.grpo_sd_loss import jsd_at_queries

    vocab, v_pad = 300, 320
    s, t, _, w = _data(vocab, v_pad, seed=3)
    s, t, w = (s * 10).float(), (t * 10).float(), w.float()
    shard = VocabShard(vocab, 0, v_pad)     # the vocab-parallel kernels, one process
    for kind, param in (("jsd", 0.5), ("jsd", 0.0), ("clipped", 0.05)):
        fn = getattr(shard, "jsd" if kind == "jsd" else "clipped_forward_kl")
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        eager = fn(a, t, param, 1.3, chunk_rows=4)
        compiled = fn(b, t, param, 1.3, chunk_rows=4, compile=True)
        (eager * w).sum().backward()
        (compiled * w).sum().backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        assert torch.all(b.grad[:, vocab:] == 0)
    for phase in (vocab_parallel._div_stats, vocab_parallel._div_partial_sums, vocab_parallel._div_gradient):
        assert phase in divergences._COMPILED, phase.__name__
    # and through the loss: sd.compile reaches the shard
    divergences._COMPILED.clear()
    is_q = torch.tensor([True, False, True, True, False, True, True])
    sd = SimpleNamespace(beta=0.5, temperature=1.0, chunk_rows=4, compile=True)
    out = jsd_at_queries(s, is_q, t[is_q], sd, vocab_shard=shard)
    assert vocab_parallel._div_partial_sums in divergences._COMPILED
    torch.testing.assert_close(out, shard.jsd(s[is_q], t[is_q], 0.5, 1.0, 4), rtol=1e-5, atol=1e-5)
