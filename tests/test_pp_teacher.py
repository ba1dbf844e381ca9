"""The teacher pass under pipeline parallelism (2 real processes, gloo): `MegatronActor.train_on` runs the
micro-batches in windows of `megatron.teacher_window`, one forward-only schedule for a window's teacher logits and
one training schedule for the window. Every window size gives the same update, bit for bit (the same teacher
logits, the same gradient accumulation order), with 2 schedules per window instead of 2 per micro-batch; and it
equals the pp = 1 update."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).parent))
from _mp import run_workers  # noqa: E402
from test_megatron import CLIP, EPS, LR, WD, make_hf, sequences, targets  # noqa: E402

N_MICRO = 5          # windows of 2: 2 + 2 + 1


@dataclass
class MB:
    batch: object
    rows: torch.Tensor
    cols: torch.Tensor
    teacher_logits: object = None


def micro_batches(actor, timer):
    """5 micro-batches of 2 sequences; the teacher reads each sequence with a different prefix (its rows shifted
    by one token), as SD-Search's teacher reads a longer prompt."""
    from nemo_sdsearch.models.base import SequenceBatch, TeacherPass

    seqs = sequences()
    out = []
    for k in range(N_MICRO):
        pair = [seqs[k % 3], seqs[(k + 1) % 3]]
        batch = SequenceBatch.from_lists(pair, pad_id=1)
        rows, cols = targets(batch)
        make = lambda pair=pair: SequenceBatch.from_lists([[5] + s for s in pair], pad_id=1)
        out.append(MB(batch, rows, cols, TeacherPass(actor, make, rows, cols + 1, timer)))
    return out


def loss_fn(logits, mb):
    """A policy term and a pull toward the teacher's logits (the shape of SD-Search's loss)."""
    teacher = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
    lsm = torch.log_softmax(logits.float(), -1)
    return -lsm.max(-1).values.mean() + ((logits.float() - teacher.float()) ** 2).mean()


def _run(d, pp, window):
    import megatron.core.pipeline_parallel as mpp

    from nemo_sdsearch.models.megatron.actor import MegatronActor

    actor = MegatronActor.from_hf(d, lr=LR, weight_decay=WD, grad_clip=CLIP, eps=EPS, teacher_window=window)
    calls = []
    real_get = mpp.get_forward_backward_func
    real = real_get()

    def recording(**k):
        calls.append("teacher" if k["forward_only"] else "train")
        return real(**k)

    mpp.get_forward_backward_func = lambda *a, **k: recording
    timer = {}
    try:
        stats = actor.train_on(micro_batches(actor, timer), loss_fn)
    finally:
        mpp.get_forward_backward_func = real_get
    return {"stats": stats, "after": actor.export_weights(), "calls": calls, "timer": timer}


def _worker(rank, world, d: str):
    warnings.filterwarnings("ignore")
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    res = {}
    init_parallel(1, pp=2)
    for window in (1, 2, 8):
        res[window] = _run(d, 2, window)
    init_parallel(1)
    res["pp1"] = _run(d, 1, 4)   # pp = 1: the closure loop, the teacher pass inside the loss
    teardown_parallel()
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "untied"
    make_hf(tied=False).save_pretrained(d)
    return run_workers(_worker, 2, str(d), timeout=300)


def test_every_teacher_window_gives_the_same_update_with_two_schedules_per_window(runs):
    for res in runs:
        one, two, all_ = res[1], res[2], res[8]
        assert one["calls"] == ["teacher", "train"] * 5                  # a schedule pair per micro-batch
        assert two["calls"] == ["teacher", "train"] * 3                  # windows 2 + 2 + 1
        assert all_["calls"] == ["teacher", "train"]                     # one window
        for other in (two, all_):
            assert other["stats"]["loss"] == one["stats"]["loss"] and not other["stats"]["skipped"]
            assert other["stats"]["grad_norm"] == one["stats"]["grad_norm"]
            assert all(torch.equal(one["after"][k], other["after"][k]) for k in one["after"])
        assert all_["timer"]["teacher_s"] > 0
    # both stages report the step; the update equals pp = 1's (float noise: another summation order)
    a, b = runs[0][8], runs[0]["pp1"]
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], rel=1e-5)
    assert max((a["after"][k] - b["after"][k]).abs().max().item() for k in a["after"]) < 1e-6
    assert runs[0][8]["stats"]["loss"] == runs[1][8]["stats"]["loss"]


def test_bench_pp_teacher_smoke_prints_its_targets():
    """`python bench/pp_teacher.py --smoke`: the three step times and both TARGET lines (timings vary: the smoke
    run checks the bench works, the full run measures)."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench" / "pp_teacher.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [l.split()[1] for l in lines if l.startswith("TARGET")] == ["pp2_teacher_step_over_no_teacher",
                                                                      "pp2_teacher_window_speedup"]
    times = {l.rsplit(None, 2)[0].strip(): float(l.split()[-2]) for l in lines
             if l.startswith(("no teacher", "window "))}
    assert set(times) == {"no teacher", "window 1", "window 4"} and all(t > 0 for t in times.values())
