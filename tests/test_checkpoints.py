"""Checkpoints a cluster can afford (keep the last K plus the best by dev EM, refuse a disk that cannot hold
one more) and preemption without loss (SIGUSR1 mid-run: the step that was running is checkpointed, the
process exits with the requeue status, and the resumed run matches an uninterrupted one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_sdsearch.algorithms.preemption import HOLD_ENV
from nemo_sdsearch.errors import EXIT_REQUEUE
from nemo_sdsearch.algorithms.state import check_free_disk, checkpoint_bytes, rotate_checkpoints
from nemo_sdsearch.config import ConfigError, load_config


def _overrides(model_dir, out_dir, **extra) -> list[str]:
    base = {"model.path": str(model_dir), "model.threads": 1, "trainer.steps": 4, "trainer.questions_per_step": 2,
            "rollout.group_size": 2, "rollout.max_new_tokens": 12, "rollout.max_turns": 1,
            "rollout.max_context": 512, "trainer.eval_every": 0, "trainer.save_every": 0,
            "trainer.final_test_eval": False, "trainer.out_dir": str(out_dir), "grpo.micro_batch_size": 2,
            "data.dev_questions": 4, "optim.lr": 1e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in (out / "checkpoints").glob("step_*"))


def test_rotation_keeps_the_newest_the_latest_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 5):
        (root / f"step_{s:06d}").mkdir(parents=True)
        (root / f"megatron_step_{s:06d}").mkdir()
    (root / "latest").write_text("step_000005")
    assert rotate_checkpoints(tmp_path, keep_last=2, keep_step=1) == [2, 3]
    assert _steps(tmp_path) == [1, 4, 5]
    assert sorted(p.name for p in root.glob("megatron_step_*")) == ["megatron_step_000001", "megatron_step_000004",
                                                                   "megatron_step_000005"]
    assert rotate_checkpoints(tmp_path, keep_last=0) == []  # 0 = keep all


def test_a_run_refuses_a_disk_that_cannot_hold_one_more_checkpoint(tmp_path, monkeypatch):
    cfg = load_config("qwen25_7b_sd_search")
    from transformers import Qwen2Config

    a = cfg.arch
    hf = Qwen2Config(hidden_size=a.hidden_size, num_hidden_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
                     num_key_value_heads=a.num_kv_heads, intermediate_size=a.ffn_hidden_size, vocab_size=a.vocab_size,
                     tie_word_embeddings=a.tied_embeddings)
    need = checkpoint_bytes(hf, distributed=True)
    assert 95 * 2**30 < need < 110 * 2**30  # a 7.6B-parameter Megatron checkpoint: ~100 GiB
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10 * need, 9 * need, need // 2))
    with pytest.raises(ConfigError, match=r"trainer.out_dir.*GiB free.*trainer.min_free_disk_checkpoints"):
        check_free_disk(tmp_path / "run" / "deeper", need, 1)
    check_free_disk(tmp_path / "run", need, 0)  # 0 = no check


def test_training_keeps_k_checkpoints_plus_the_best(micro_model_dir, tmp_path):
    from nemo_sdsearch.algorithms import grpo

    out = tmp_path / "run"
    cfg = load_config("tiny_cpu", _overrides(micro_model_dir[0], out, **{
        "trainer.save_every": 1, "trainer.eval_every": 1, "trainer.keep_last": 1, "trainer.steps": 4}))
    summary = grpo.train(cfg, progress=False)
    evals = [e for e in summary["evals"] if "val/dev_em" in e]
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    best = max(evals, key=lambda e: e["val/dev_em"])["step"]  # the first of equal ones: the earliest
    assert _steps(out) == sorted({4, best})
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"


def _train_cli(args, hold=None, env=None, log=None) -> subprocess.Popen:
    """`sdsearch train ARGS` in a subprocess, its output in a pipe or, with `log`, that file (a run held while
    nobody reads its pipe could fill it and block); `hold=(n, dir)`: held at the start of step n until it is
    signalled (SDSEARCH_TEST_HOLD, algorithms/preemption.py; `wait_held`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop(HOLD_ENV, None)
    if hold is not None:
        env[HOLD_ENV] = f"{hold[0]}:{hold[1]}"
    cmd = [sys.executable, "-m", "nemo_sdsearch.cli", "train", *args]
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_held(procs, folder: Path, ranks=(0,), timeout_s: float = 600.0) -> dict[int, int]:
    """Until every rank of `ranks` is held (SDSEARCH_TEST_HOLD): their pids by rank. Fails when a process of
    `procs` (one or a list) ends first."""
    procs = procs if isinstance(procs, list) else [procs]
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"held.{r}").exists() for r in ranks):
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"ended before it was held: {ended[0]}"
        assert time.monotonic() < deadline, "not held"
        time.sleep(0.01)
    return {r: int((folder / f"held.{r}").read_text()) for r in ranks}


def _rows(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


@pytest.mark.timeout(600)
def test_sigusr1_checkpoints_the_running_step_and_the_resumed_run_matches(micro_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = micro_model_dir[0]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    steps = {"trainer.steps": 5}
    p = _train_cli(_overrides(model, straight, **steps))
    out_straight, _ = p.communicate(timeout=500)
    assert p.returncode == 0, out_straight[-3000:]
    hold, log = tmp_path / "hold", tmp_path / "cut.log"
    hold.mkdir()
    p = _train_cli(_overrides(model, cut, **steps), hold=(3, hold), log=log)
    try:
        wait_held(p, hold)
        p.send_signal(signal.SIGUSR1)  # during step 3 (held there until the signal): that step is finished and saved
        p.wait(timeout=300)
    finally:
        p.kill()
        p.wait()
    out_cut = log.read_text()
    tail = "\n".join(line for line in out_cut.splitlines() if line.startswith(("step ", "preempted", "[")))[-2000:]
    assert p.returncode == EXIT_REQUEUE, tail
    assert len(_rows(cut)) == 3, tail
    assert _steps(cut) == [3] and f"preempted (signal {int(signal.SIGUSR1)}): step 3 checkpointed" in out_cut, tail
    p = _train_cli(_overrides(model, cut, **steps, **{"trainer.resume": True}))
    out_resumed, _ = p.communicate(timeout=500)
    assert p.returncode == 0, out_resumed[-3000:]
    # timings differ; compared as JSON text, so that NaN (sd/* without query tokens) equals NaN
    strip = lambda r: json.dumps({k: v for k, v in r.items() if not k.startswith(("timing", "perf/"))}, sort_keys=True)
    assert [strip(r) for r in _rows(cut)] == [strip(r) for r in _rows(straight)]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
