"""SIGTERM and SIGUSR1 in the trainer (algorithms/preemption.py), on real processes: a SIGTERM far from a step's
end exits at once even while the main thread is blocked in a gloo collective with a peer that never answers
(what keeps a crashed job's survivors alive), one near a step's end is noted and the step finishes; the
end-of-allocation lead is checked against the recipe's estimates at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nemo_sdsearch.algorithms.preemption import (EXIT_REQUEUE, EXIT_TERMINATED, LEAD_ENV, StopRequest,
                                              check_signal_lead)
from nemo_sdsearch.config import ConfigError

BLOCKED = r"""
import datetime, os, signal, sys, time
import torch.distributed as dist
import torch
from nemo_sdsearch.algorithms.preemption import StopRequest, EXIT_REQUEUE
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[2]}",
                        timeout=datetime.timedelta(seconds=120))
if rank == 1:           # the peer: answers after sys.argv[4] seconds (never, in the first case)
    time.sleep(float(sys.argv[4]))
    dist.send(torch.ones(1), dst=0)
    time.sleep(5)
    sys.exit(0)
stop = StopRequest(grace_s=20, step_time_s=float(sys.argv[3]))
stop.step_started(0)
print("blocked", flush=True)
dist.recv(torch.zeros(1), src=1)     # in C++, the GIL released: no Python signal handler runs until it returns
print("returned, signal", stop.signum, flush=True)
sys.exit(EXIT_REQUEUE if stop.signum == signal.SIGTERM else 0)
"""


def _pair(step_time_s: float, answer_after_s: float):
    from _mp import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BLOCKED, str(r), str(port), str(step_time_s),
                               str(answer_after_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    line = procs[0].stdout.readline()
    assert line.strip() == "blocked", procs[0].stderr.read()
    time.sleep(0.5)  # inside recv now
    return procs


def test_sigterm_far_from_a_step_end_exits_at_once_while_blocked_in_a_collective():
    procs = _pair(step_time_s=1000, answer_after_s=300)
    try:
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        out, err = procs[0].communicate(timeout=30)
        took = time.monotonic() - t0
        assert procs[0].returncode == EXIT_TERMINATED, err
        assert took < 5, took  # not the collective's 120 s timeout
        assert "SIGTERM during step 1" in err and "exiting now without a checkpoint" in err
        assert "returned" not in out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_sigterm_near_a_step_end_is_noted_and_the_step_finishes():
    procs = _pair(step_time_s=5, answer_after_s=3)  # the step ends within the 20 s grace
    try:
        procs[0].send_signal(signal.SIGTERM)
        out, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == EXIT_REQUEUE, err
        assert f"returned, signal {int(signal.SIGTERM)}" in out or "returned, signal Signals.SIGTERM" in out, out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_signal_lead_must_cover_a_step_and_its_checkpoint(monkeypatch):
    monkeypatch.setenv(LEAD_ENV, "300")
    check_signal_lead(200.0, 60.0)   # 260 s fit in 300
    check_signal_lead(None, 60.0)    # no estimate: nothing to check
    with pytest.raises(ConfigError, match=r"trainer.step_time_s.*need 840 s.*300 s before.*--signal=B:USR1@1080"):
        check_signal_lead(600.0, 240.0)
    monkeypatch.delenv(LEAD_ENV)
    check_signal_lead(600.0, 240.0)  # not under a job script that declares a lead


def test_the_trainer_exits_at_once_on_sigterm_mid_step(micro_model_dir, tmp_path):
    """`sdsearch train` with a step estimated at 1000 s: a SIGTERM once step 1 is checkpointed (so during step 2,
    which takes a few seconds here) ends the process at once (status 143, the step named), with step 1's
    checkpoint the last one."""
    from test_checkpoints import _overrides, _steps, _train_cli

    out_dir = tmp_path / "run"
    p = _train_cli(_overrides(micro_model_dir[0], out_dir, **{
        "trainer.save_every": 1, "trainer.steps": 50, "trainer.step_time_s": 1000, "trainer.questions_per_step": 4,
        "rollout.group_size": 4, "rollout.max_new_tokens": 64, "rollout.max_turns": 2}))
    try:
        deadline = time.monotonic() + 400
        while not (out_dir / "checkpoints" / "latest").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert _steps(out_dir) == [1], p.communicate(timeout=60)[0][-3000:]
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == EXIT_TERMINATED and time.monotonic() - t0 < 10, out[-3000:]
        assert "SIGTERM during step 2" in out and "exiting now without a checkpoint" in out, out[-3000:]
        assert _steps(out_dir) == [1], _steps(out_dir)
    finally:
        p.kill()
        p.wait()


def test_the_step_boundary_is_near_and_outside_the_steps_is_not():
    stop = StopRequest(signals=(), step_time_s=100.0)
    assert stop.seconds_to_boundary() is None                  # before the first step: exit at once
    stop.step_started(0)
    assert 99 < stop.seconds_to_boundary() <= 100              # the estimate (no step measured yet)
    stop.step_finished()
    assert stop.seconds_to_boundary() == 0.0                   # agreeing and checkpointing: near
    stop.step_started(1)
    assert 99 < stop.seconds_to_boundary() <= 100              # the longer of the estimate and the measured mean
    stop.outside_steps()
    assert stop.seconds_to_boundary() is None                  # the final evaluation: exit at once
    assert StopRequest(signals=()).seconds_to_boundary() is None
