"""Vocab-parallel log-probs and divergences on real gloo process groups (CPU, no mocks of torch.distributed).

One spawn of 4 processes builds TP groups of size 1 ([0], [1], [2], [3]), 2 ([0, 1], [2, 3]), 3 ([0, 1, 2])
and 4 (WORLD) and checks, in fp64 against the dense references on the gathered logits, the per-row values
and the gradient with respect to each rank's student shard (TP padding columns hold large garbage and must
get exactly zero gradient); at TP 1, 2 and 3 it checks fp32 inputs with large logits (an offset of 1e3, a
teacher offset by 1e3, a range of +-1e4) against fp64 references of the same values; then it counts the
collectives each call issues. Each rank writes its results to a JSON file; the tests below read them. A
second spawn of 2 processes checks that megatron's model-parallel state is never looked up: the TP group is
passed (a `VocabShard` carries it), and `group=None` stays WORLD.
"""

from __future__ import annotations

import json
import math
import os
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _mp import rendezvous_store

from nemo_sdsearch.losses.divergences import (
    clipped_forward_kl_dense,
    generalized_jsd_dense,
)
from nemo_sdsearch.core.vocab import pad_vocab_size
from nemo_sdsearch.losses.vocab_parallel import (
    shard_logits,
    token_logprobs,
    vocab_parallel_argmax,
    vocab_parallel_clipped_forward_kl,
    vocab_parallel_entropy,
    vocab_parallel_generalized_jsd,
    vocab_parallel_logprobs,
)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

D = torch.float64
ROWS = 12
WORLD = 4
TPS = (1, 2, 4)
# (real vocab, megatron make_vocab_size_divisible_by): 1001 -> 1024 columns at every tp (padding on the
# last rank); 130 with multiple 64 at tp=4 -> 256 columns, Vp=64: rank 2 has 2 real columns, rank 3 none.
VOCABS = ((1001, 128), (130, 64))
JSD_CASES = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.0, 2.5), (0.5, 2.5), (1.0, 2.5), (0.3, 0.7))
CLIP_CASES = ((10.0, 1.0, True), (0.5, 2.0, True), (1e9, 1.0, False))  # (tau, T, clip active)
LOGPROB_TEMPS = (1.0, 1.7)
# Large logits (fp32 inputs vs fp64 references of the same values) at TP 1, 2 and 3 ([0, 1, 2]; rank 3 idles):
# 500 real columns padded to a multiple of 64 * tp (512, 512, 576: at tp=3 Vp=192, rank 2 holds 116).
LARGE_TPS = (1, 2, 3)
LARGE_VOCAB = (500, 64)
LARGE_CASES = ("offset", "teacher_offset", "uniform")
LARGE_TEMPS = (0.7, 1.0, 2.0)
LARGE_DIVS = (("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("clipped", 0.05))
LARGE_TOL = 2e-6  # about 30 fp32 ulps; `x / T - (M / T + log S)` is 1e-5 .. 1e-3 off at these offsets
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
               "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv",
               "all_gather_object", "broadcast_object_list", "all_reduce_coalesced")


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # every rank a client of the parent's store on `port`
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))


def _data(seed: int, vocab: int, v_pad: int):
    """fp64 student/teacher logits [ROWS, v_pad] with std ~30 (half the teacher rows near the student),
    garbage in the padding columns, and target ids including the shard boundaries and the last real id."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 30
    t = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 30
    t[::2] = s[::2] + torch.randn(ROWS // 2, v_pad, generator=g, dtype=D) * 3
    s[:, vocab:] = 1e4
    t[:, vocab:] = 2e4
    targets = torch.randint(0, vocab, (ROWS,), generator=g)
    targets[:4] = torch.tensor([0, vocab - 1, min(63, vocab - 1), min(64, vocab - 1)])
    w = torch.rand(ROWS, generator=g, dtype=D) + 0.5
    return s, t, targets, w


_FAILURES: list = []  # soft assertions inside the workers: every rank keeps its collectives in step


def _expect(cond, what: str) -> None:
    if not cond:
        _FAILURES.append(what)


def _expect_close(actual, expected, what: str, **tol) -> None:
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as e:
        _FAILURES.append(f"{what}: {e}")


def _dense_logprobs(x: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The plain torch reference: log_softmax(x / T)[target] per row (in x's dtype, fp64 here)."""
    return torch.log_softmax(x / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)


def _pad_cols(x: torch.Tensor, v_pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, v_pad - x.shape[1]))


def _check_against_dense(op, dense, s_full, t_full, w, vocab, v_pad, rank, tp, *, t_needs_grad=True):
    """Loss and student-shard gradient of `op` (on the shards) vs `dense` (on the real columns), fp64."""
    s_ref = s_full[:, :vocab].clone().requires_grad_()
    ref = dense(s_ref, t_full[:, :vocab])
    (ref * w).sum().backward()
    g_ref = shard_logits(_pad_cols(s_ref.grad, v_pad), rank, tp)

    s_sh = shard_logits(s_full, rank, tp).requires_grad_()
    t_sh = shard_logits(t_full, rank, tp).requires_grad_(t_needs_grad)
    out = op(s_sh, t_sh)
    _expect(out.shape == (ROWS,) and out.dtype == s_full.dtype, f"output {out.shape} {out.dtype}")
    _expect_close(out, ref.detach().to(out.dtype), "loss", rtol=1e-10, atol=1e-9)
    (out * w).sum().backward()
    _expect_close(s_sh.grad, g_ref, "student gradient", rtol=1e-9, atol=1e-10)
    vp = v_pad // tp
    n_real = max(0, min(vp, vocab - rank * vp))
    _expect(torch.all(s_sh.grad[:, n_real:] == 0), "TP padding columns got a gradient")
    _expect(t_sh.grad is None, "the teacher must be under stop-gradient")
    return ref.detach()


def _large_data(case: str, vocab: int, v_pad: int, seed: int = 0):
    """fp32 (student, teacher, targets, weights) [ROWS, v_pad]: "offset": every logit + 1e3; "teacher_offset":
    teacher = student + noise + 1e3; "uniform": uniform in [-1e4, 1e4]. Padding columns hold +-3e4."""
    g = torch.Generator().manual_seed(seed)
    if case == "offset":
        s = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 3 + 1e3
        t = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 3 + 1e3
    elif case == "teacher_offset":
        s = torch.randn(ROWS, v_pad, generator=g, dtype=D) * 3
        t = s + torch.randn(ROWS, v_pad, generator=g, dtype=D) + 1e3
    else:
        s = (torch.rand(ROWS, v_pad, generator=g, dtype=D) * 2 - 1) * 1e4
        t = (torch.rand(ROWS, v_pad, generator=g, dtype=D) * 2 - 1) * 1e4
    s[:, vocab:] = 3e4
    t[:, vocab:] = -3e4
    targets = torch.randint(0, vocab, (ROWS,), generator=g)
    w = torch.rand(ROWS, generator=g, dtype=D) + 0.5
    return s.float(), t.float(), targets, w


def _value_err(out, ref) -> float:
    """max over rows of |out - ref| / max(|ref|, 1)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float(((out - ref).abs() / ref.abs().clamp(min=1.0)).max())


def _grad_err(grad, ref_grad, ref_loss) -> float:
    """max over rows of max_v |grad - ref| / max(max_v |ref|, |loss|, 1) (the reverse-KL / JSD gradient
    q (g - loss) cancels numbers of the size of the row's loss, so that is the floor of its scale)."""
    grad, ref_grad = grad.detach().double(), ref_grad.detach().double()
    scale = torch.maximum(ref_grad.abs().amax(-1), ref_loss.detach().double().abs()).clamp(min=1.0)
    return float(((grad - ref_grad).abs().amax(-1) / scale).max())


def _large_checks(case, tp, group, r):
    """fp32 divergences (values and student-shard gradients), log-probs and entropy at large logits vs fp64."""
    vocab, multiple = LARGE_VOCAB
    v_pad = pad_vocab_size(vocab, tp, multiple)
    vp = v_pad // tp
    n_real = max(0, min(vp, vocab - r * vp))
    s, t, targets, w = _large_data(case, vocab, v_pad)
    s_sh, t_sh = shard_logits(s, r, tp), shard_logits(t, r, tp)
    for temp in LARGE_TEMPS:
        for kind, param in LARGE_DIVS:
            what = f"{case} T={temp} {kind}({param})"
            dense = generalized_jsd_dense if kind == "jsd" else clipped_forward_kl_dense
            x = s[:, :vocab].double().requires_grad_()
            ref = dense(x, t[:, :vocab].double(), param, temp)
            (ref * w).sum().backward()
            g_ref = shard_logits(_pad_cols(x.grad, v_pad), r, tp)
            a = s_sh.clone().requires_grad_()
            op = vocab_parallel_generalized_jsd if kind == "jsd" else vocab_parallel_clipped_forward_kl
            out = op(a, t_sh, group, vocab, param, temp, chunk_rows=5)
            (out * w.float()).sum().backward()
            _expect(out.dtype == torch.float32 and a.grad.dtype == torch.float32, f"{what}: dtype")
            err, gerr = _value_err(out, ref), _grad_err(a.grad, g_ref, ref)
            _expect(err < LARGE_TOL, f"{what}: value error {err:.2e}")
            _expect(gerr < LARGE_TOL, f"{what}: gradient error {gerr:.2e}")
            _expect(torch.all(a.grad[:, n_real:] == 0), f"{what}: TP padding columns got a gradient")
        # log-probs and entropy of the logits that carry the offset
        logits, sh = (t, t_sh) if case == "teacher_offset" else (s, s_sh)
        x = logits[:, :vocab].double().requires_grad_()
        ld = torch.log_softmax(x / temp, -1)
        ref = _dense_logprobs(x, targets, temp)
        (ref * w).sum().backward()
        g_ref = shard_logits(_pad_cols(x.grad, v_pad), r, tp)
        a = sh.clone().requires_grad_()
        out = vocab_parallel_logprobs(a, targets, group, vocab, temperature=temp, chunk_rows=5)
        (out * w.float()).sum().backward()
        zero = torch.zeros_like(ref)
        err, gerr = _value_err(out, ref), _grad_err(a.grad, g_ref, zero)
        _expect(err < LARGE_TOL, f"{case} T={temp} logprobs: value error {err:.2e}")
        _expect(gerr < LARGE_TOL, f"{case} T={temp} logprobs: gradient error {gerr:.2e}")
        ent = vocab_parallel_entropy(sh, group, vocab, temperature=temp, chunk_rows=5)
        err = _value_err(ent, -(ld.exp() * ld).sum(-1))
        _expect(err < LARGE_TOL, f"{case} T={temp} entropy: value error {err:.2e}")
        if tp == 1:  # token_logprobs (no group) on the full fp32 logits, inside the initialised WORLD
            y = logits[:, :vocab].clone().requires_grad_()
            out = token_logprobs(y, targets, temp)
            (out * w.float()).sum().backward()
            err, gerr = _value_err(out, ref), _grad_err(y.grad, x.grad, zero)
            _expect(err < LARGE_TOL and gerr < LARGE_TOL, f"{case} T={temp} token_logprobs: {err:.2e} {gerr:.2e}")


def _correctness_checks(rank, groups):
    """Yield (check name, thunk)."""
    for tp in TPS:
        group = groups[tp]
        r = dist.get_rank(group)
        for vocab, multiple in VOCABS:
            v_pad = pad_vocab_size(vocab, tp, multiple)
            tag = f"tp{tp}"
            for ci, (beta, temp) in enumerate(JSD_CASES):
                def run(beta=beta, temp=temp, ci=ci, vocab=vocab, v_pad=v_pad, tp=tp, group=group, r=r):
                    s, t, _, w = _data(100 + ci, vocab, v_pad)
                    for chunk in (5, 256):
                        _check_against_dense(
                            lambda a, b, chunk=chunk: vocab_parallel_generalized_jsd(
                                a, b, group, vocab, beta=beta, temperature=temp, chunk_rows=chunk),
                            lambda a, b: generalized_jsd_dense(a, b, beta, temp), s, t, w, vocab, v_pad, r, tp)
                yield f"jsd-{tag}", run
            for ci, (tau, temp, active) in enumerate(CLIP_CASES):
                def run(tau=tau, temp=temp, active=active, ci=ci, vocab=vocab, v_pad=v_pad, tp=tp, group=group,
                        r=r):
                    s, t, _, w = _data(200 + ci, vocab, v_pad)
                    ls = torch.log_softmax(s[:, :vocab] / temp, -1)
                    lt = torch.log_softmax(t[:, :vocab] / temp, -1)
                    terms = lt.exp() * (lt - ls)
                    _expect(bool((terms > tau).any()) == active, "clip activity")
                    ref = _check_against_dense(
                        lambda a, b: vocab_parallel_clipped_forward_kl(a, b, group, vocab, tau=tau, temperature=temp,
                                                                       chunk_rows=5),
                        lambda a, b: clipped_forward_kl_dense(a, b, tau, temp), s, t, w, vocab, v_pad, r, tp)
                    if active:  # the clip changes the loss, not just a rounding
                        _expect((terms.sum(-1) - ref).max() > 1.0, "clip changes the loss")
                yield f"clipped-{tag}", run
            for ci, temp in enumerate(LOGPROB_TEMPS):
                def run(temp=temp, ci=ci, vocab=vocab, v_pad=v_pad, tp=tp, group=group, r=r):
                    s, _, targets, w = _data(300 + ci, vocab, v_pad)
                    s_ref = s[:, :vocab].clone().requires_grad_()
                    ref = _dense_logprobs(s_ref, targets, temp)
                    (ref * w).sum().backward()
                    g_ref = shard_logits(_pad_cols(s_ref.grad, v_pad), r, tp)
                    for chunk in (5, 1024):
                        s_sh = shard_logits(s, r, tp).requires_grad_()
                        out = vocab_parallel_logprobs(s_sh, targets, group, vocab, temperature=temp, chunk_rows=chunk)
                        _expect(out.dtype == D, "dtype")
                        _expect_close(out, ref.detach(), "logprobs", rtol=1e-10, atol=1e-9)
                        (out * w).sum().backward()
                        _expect_close(s_sh.grad, g_ref, "logprobs gradient", rtol=1e-9, atol=1e-10)
                yield f"logprobs-{tag}", run

        def run_extras(tp=tp, group=group, r=r):
            vocab, v_pad = 1001, pad_vocab_size(1001, tp)
            s, t, targets, w = _data(400, vocab, v_pad)
            # bf16 inputs: computed and returned in fp32, gradient in the student's dtype; the reference is
            # the fp64 dense loss of the same bf16-rounded logits.
            s, t = s.to(torch.bfloat16), t.to(torch.bfloat16)
            s_ref = s[:, :vocab].double().requires_grad_()
            ref = generalized_jsd_dense(s_ref, t[:, :vocab].double(), 0.5, 2.0)
            (ref * w).sum().backward()
            s_bf = shard_logits(s, r, tp).requires_grad_()
            out = vocab_parallel_generalized_jsd(s_bf, shard_logits(t, r, tp), group, vocab, beta=0.5,
                                                 temperature=2.0, chunk_rows=5)
            _expect(out.dtype == torch.float32, f"bf16 -> {out.dtype}")
            _expect_close(out.double(), ref.detach(), "bf16 loss", rtol=1e-4, atol=1e-4)
            (out * w.float()).sum().backward()
            _expect(s_bf.grad.dtype == torch.bfloat16, f"bf16 grad {s_bf.grad.dtype}")
            g_ref = shard_logits(_pad_cols(s_ref.grad, v_pad), r, tp)
            _expect_close(s_bf.grad.double(), g_ref, "bf16 gradient", rtol=1e-2, atol=1e-4)
            # backward rounds once: the stored bf16 gradient (grad_output = 1) times w formed in fp32, not the
            # triple-rounded bf16 product
            s_one = shard_logits(s, r, tp).requires_grad_()
            vocab_parallel_generalized_jsd(s_one, shard_logits(t, r, tp), group, vocab, beta=0.5, temperature=2.0,
                                           chunk_rows=5).sum().backward()
            single = (s_one.grad.float() * w.float()[:, None]).to(torch.bfloat16)
            triple = s_one.grad * w.float().to(torch.bfloat16)[:, None]
            _expect(torch.equal(s_bf.grad, single), "bf16 backward is not the once-rounded fp32 product")
            _expect(not torch.equal(single, triple), "the bf16 case does not tell the roundings apart")
            exact = s_one.grad.double() * w[:, None]
            err = lambda g: float((g.double() - exact).abs().sum())
            _expect(err(s_bf.grad) < err(triple), f"once-rounded {err(s_bf.grad)} vs triple {err(triple)}")
            lp = vocab_parallel_logprobs(shard_logits(s, r, tp), targets, group, vocab)
            _expect(lp.dtype == torch.float32, f"bf16 logprobs -> {lp.dtype}")
            _expect_close(lp.double(), _dense_logprobs(s[:, :vocab].double(), targets), "bf16 logprobs",
                          rtol=1e-5, atol=1e-4)
            s, t = s.double(), t.double()
            # inplace_grad: same gradient, written over the student logits during forward.
            _check_against_dense(
                lambda a, b: vocab_parallel_generalized_jsd(a.clone(), b, group, vocab, beta=0.5, chunk_rows=5,
                                                            inplace_grad=True),
                lambda a, b: generalized_jsd_dense(a, b, 0.5), s, t, w, vocab, v_pad, r, tp)
        yield f"extras-tp{tp}", run_extras

    for tp in LARGE_TPS:
        group = groups[tp]
        member = group is not None
        for case in LARGE_CASES:
            if member:
                yield f"large-{case}-tp{tp}", lambda case=case, tp=tp, group=group: _large_checks(
                    case, tp, group, dist.get_rank(group))
            else:  # not in the tp=3 group: nothing to check, nothing to communicate
                yield f"large-{case}-tp{tp}", lambda: None

    def run_default_world():  # group=None without megatron's model parallel state: WORLD (tp=4)
        vocab = 1001
        v_pad = pad_vocab_size(vocab, WORLD)
        s, t, _, w = _data(500, vocab, v_pad)
        _check_against_dense(lambda a, b: vocab_parallel_generalized_jsd(a, b, vocab_size=vocab, chunk_rows=5),
                             lambda a, b: generalized_jsd_dense(a, b, 0.5), s, t, w, vocab, v_pad, rank, WORLD)
    yield "default-group-world", run_default_world


class _Counter:
    """Counts calls of every torch.distributed collective (wrapping the real functions)."""

    def __init__(self):
        self.calls: list = []
        self.saved = []
        from torch.distributed import distributed_c10d
        for mod in (dist, distributed_c10d):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is None:
                    continue
                self.saved.append((mod, name, fn))
                setattr(mod, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if name == "all_reduce":
                op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
                self.calls.append((name, str(op).split(".")[-1], list(args[0].shape)))
            else:
                self.calls.append((name, None, None))
            return fn(*args, **kwargs)
        return wrapper

    def take(self):
        calls, self.calls = self.calls, []
        return calls

    def restore(self):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


def _ops(group, vocab, t_sh, targets):
    return {
        "logprobs": lambda a: vocab_parallel_logprobs(a, targets, group, vocab, 1.5, chunk_rows=5),
        "jsd-0": lambda a: vocab_parallel_generalized_jsd(a, t_sh, group, vocab, 0.0, chunk_rows=5),
        "jsd-0.5": lambda a: vocab_parallel_generalized_jsd(a, t_sh, group, vocab, 0.5, 1.5, chunk_rows=5),
        "jsd-1": lambda a: vocab_parallel_generalized_jsd(a, t_sh, group, vocab, 1.0, chunk_rows=5),
        "clipped": lambda a: vocab_parallel_clipped_forward_kl(a, t_sh, group, vocab, 10.0, chunk_rows=5),
    }


def _count_collectives(rank, groups):
    """For each op and tp: the collectives of one forward (ROWS=12 rows, chunk_rows=5 -> 3 chunks) and of
    its backward."""
    out = {}
    counter = _Counter()
    try:
        for tp in TPS:
            group = groups[tp]
            r = dist.get_rank(group)
            vocab, v_pad = 1001, pad_vocab_size(1001, tp)
            s, t, targets, w = _data(600, vocab, v_pad)
            ops = _ops(group, vocab, shard_logits(t, r, tp), targets)
            for name, op in ops.items():
                a = shard_logits(s, r, tp).requires_grad_()
                counter.take()
                loss = (op(a) * w).sum()
                fwd = counter.take()
                loss.backward()
                bwd = counter.take()
                out[f"tp{tp}-{name}"] = {"forward": fwd, "backward": bwd}
            s_sh = shard_logits(s, r, tp)
            for name, metric in (("argmax", lambda: vocab_parallel_argmax(s_sh, group, vocab)),
                                 ("entropy", lambda: vocab_parallel_entropy(s_sh, group, vocab, 1.5, chunk_rows=5))):
                counter.take()
                metric()
                out[f"tp{tp}-{name}"] = counter.take()
        vocab = 1001
        s, _, targets, w = _data(601, vocab, vocab)
        a = s.clone().requires_grad_()
        counter.take()
        loss = (token_logprobs(a, targets, 1.5, chunk_rows=5) * w).sum()
        fwd = counter.take()
        loss.backward()
        out["token_logprobs"] = {"forward": fwd, "backward": counter.take()}
    finally:
        counter.restore()
    return out


def _worker(rank, world, port, out_dir):
    _init(rank, world, port)
    groups = {WORLD: dist.group.WORLD}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([i]) for i in range(WORLD)]
    triple = dist.new_group([0, 1, 2])   # every rank creates every group; rank 3 is not a member
    groups[2] = pairs[rank // 2]
    groups[1] = singles[rank]
    groups[3] = triple if rank < 3 else None
    results: dict = {}
    for name, check in _correctness_checks(rank, groups):
        _FAILURES.clear()
        try:
            check()
        except Exception:  # noqa: BLE001 - reported by the test that reads this file
            _FAILURES.append(traceback.format_exc())
        if _FAILURES and results.get(name, "ok") == "ok":
            results[name] = "\n".join(_FAILURES)
        results.setdefault(name, "ok")
    dist.barrier()
    try:
        counts = _count_collectives(rank, groups)
    except Exception:  # noqa: BLE001
        counts = {"error": traceback.format_exc()}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"checks": results, "counts": counts}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    with rendezvous_store() as env:  # held open by this process: no port released for a child to bind
        mp.spawn(_worker, args=(WORLD, int(env["MASTER_PORT"]), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _assert_check(spawned, name):
    failures = [f"rank {r}:\n{res['checks'].get(name, 'missing')}" for r, res in enumerate(spawned)
                if res["checks"].get(name) != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", TPS)
def test_jsd_matches_dense(spawned, tp):
    """beta in {0, 0.3, 0.5, 1}, T in {0.7, 1, 2.5}, two chunk sizes, two padded vocabularies."""
    _assert_check(spawned, f"jsd-tp{tp}")


@pytest.mark.parametrize("tp", TPS)
def test_clipped_kl_matches_dense(spawned, tp):
    """tau = 10 and 0.5 (clip active), 1e9 (inactive); T in {1, 2}."""
    _assert_check(spawned, f"clipped-tp{tp}")


@pytest.mark.parametrize("tp", TPS)
def test_logprobs_match_dense(spawned, tp):
    _assert_check(spawned, f"logprobs-tp{tp}")


@pytest.mark.parametrize("tp", TPS)
def test_bf16_and_inplace_grad(spawned, tp):
    _assert_check(spawned, f"extras-tp{tp}")


def test_default_group_is_world_without_megatron(spawned):
    _assert_check(spawned, "default-group-world")


@pytest.mark.parametrize("tp", LARGE_TPS)
@pytest.mark.parametrize("case", LARGE_CASES)
def test_large_logits_match_fp64(spawned, case, tp):
    """fp32 logits with an offset of 1e3, a teacher offset by 1e3, or a range of +-1e4, at T in {0.7, 1, 2}:
    divergence values and gradients (beta 0, 0.5, 1, clipped), log-probs (values, gradients) and entropy
    within LARGE_TOL of the fp64 references of the same values."""
    _assert_check(spawned, f"large-{case}-tp{tp}")


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("op", ["logprobs", "jsd-0", "jsd-0.5", "jsd-1", "clipped"])
def test_collectives_per_chunk(spawned, tp, op):
    """At most 2 all-reduces per chunk in forward (3 chunks here), no other collective, none in backward."""
    n_chunks = math.ceil(ROWS / 5)
    for r, res in enumerate(spawned):
        assert "error" not in res["counts"], res["counts"].get("error")
        rec = res["counts"][f"tp{tp}-{op}"]
        fwd, bwd = rec["forward"], rec["backward"]
        assert bwd == [], f"rank {r}: collectives in backward: {bwd}"
        assert all(c[0] == "all_reduce" for c in fwd), f"rank {r}: {fwd}"
        if tp == 1:
            assert fwd == []
            continue
        assert len(fwd) <= 2 * n_chunks, f"rank {r}: {len(fwd)} all-reduces for {n_chunks} chunks: {fwd}"
        # What each all-reduce carries (chunks of 5, 5, 2 rows).
        for c, rows in enumerate((5, 5, 2)):
            first, second = fwd[2 * c], fwd[2 * c + 1]
            if op == "logprobs":
                assert first[1:] == ["MAX", [rows]] and second[1:] == ["SUM", [2, rows]]
            else:
                k = 2 if op in ("jsd-0.5", "clipped") else 1
                assert first[1:] == ["SUM", [tp, 4, rows]] and second[1:] == ["SUM", [k, rows]]


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("op", ["argmax", "entropy"])
def test_metric_collectives(spawned, tp, op):
    """The metrics: one SUM all-reduce of the per-rank slots (per chunk for the entropy), none at tp=1."""
    for r, res in enumerate(spawned):
        calls = res["counts"][f"tp{tp}-{op}"]
        if tp == 1:
            assert calls == [], f"rank {r}: {calls}"
        elif op == "argmax":
            assert calls == [["all_reduce", "SUM", [tp, 2, ROWS]]], f"rank {r}: {calls}"
        else:
            assert calls == [["all_reduce", "SUM", [tp, 3, rows]] for rows in (5, 5, 2)], f"rank {r}: {calls}"


def test_token_logprobs_communicates_nothing(spawned):
    """token_logprobs on the full logits inside an initialised process group of 4: no collective at all."""
    for r, res in enumerate(spawned):
        assert res["counts"]["token_logprobs"] == {"forward": [], "backward": []}, f"rank {r}: {res['counts']}"


def test_no_process_group_means_tp1():
    """Without an initialised process group the ops run on the full vocabulary and communicate nothing."""
    assert not dist.is_initialized()
    vocab = 1001
    s, t, targets, _ = _data(700, vocab, pad_vocab_size(vocab, 1))
    out = vocab_parallel_generalized_jsd(s, t, vocab_size=vocab, beta=0.5)
    torch.testing.assert_close(out, generalized_jsd_dense(s[:, :vocab], t[:, :vocab], 0.5), rtol=1e-10, atol=1e-9)
    lp = vocab_parallel_logprobs(s, targets, vocab_size=vocab)
    torch.testing.assert_close(lp, _dense_logprobs(s[:, :vocab], targets), rtol=1e-10, atol=1e-9)
    assert torch.equal(token_logprobs(s[:, :vocab], targets), lp)   # the same code, the single-device case
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs(s, targets)


def test_pad_vocab_size_and_shards():
    assert pad_vocab_size(1001, 1) == 1024
    assert pad_vocab_size(1001, 4) == 1024
    assert pad_vocab_size(1025, 2) == 1280
    assert pad_vocab_size(151936, 1) == 151936      # Qwen2: 1187 * 128
    assert pad_vocab_size(151936, 8) == 152576      # multiple of 1024
    assert pad_vocab_size(130, 4, 64) == 256
    full = torch.arange(2 * 256.0).view(2, 256)
    assert torch.equal(torch.cat([shard_logits(full, r, 4) for r in range(4)], -1), full)
    with pytest.raises(ValueError):
        shard_logits(full, 0, 3)


def _megatron_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    result = "ok"
    try:
        from megatron.core import parallel_state as mpu

        from nemo_sdsearch.losses.shard import VocabShard
        from nemo_sdsearch.losses.vocab_parallel import _resolve_group

        mpu.initialize_model_parallel(tensor_model_parallel_size=1)
        # No global state is consulted: group=None is WORLD even under megatron's model-parallel state ...
        group, tp, r = _resolve_group(None)
        assert group is dist.group.WORLD and (tp, r) == (world, rank)
        # ... and a megatron actor passes its TP group (this rank alone, so the full logits are its one shard;
        # WORLD, of size 2, would treat them as a shard)
        vocab = 1001
        v_pad = pad_vocab_size(vocab, 1)
        shard = VocabShard.of_rank(mpu.get_tensor_model_parallel_group(), vocab, v_pad)
        assert (shard.start, shard.end) == (0, v_pad)
        s, t, _, w = _data(800, vocab, v_pad)
        counter = _Counter()
        try:
            _check_against_dense(lambda a, b: shard.clipped_forward_kl(a, b, chunk_rows=5),
                                 lambda a, b: clipped_forward_kl_dense(a, b), s, t, w, vocab, v_pad, 0, 1)
            calls = counter.take()
        finally:
            counter.restore()
        assert calls == [], f"a TP group of one communicates: {calls}"
        assert not _FAILURES, _FAILURES
        mpu.destroy_model_parallel()
    except Exception:  # noqa: BLE001
        result = traceback.format_exc()
    with open(f"{out_dir}/megatron{rank}.txt", "w") as f:
        f.write(result)
    dist.destroy_process_group()


def test_megatron_tp_group_is_passed_not_looked_up(tmp_path):
    pytest.importorskip("megatron.core")
    with rendezvous_store() as env:
        mp.spawn(_megatron_worker, args=(2, int(env["MASTER_PORT"]), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert (tmp_path / f"megatron{r}.txt").read_text() == "ok"
