"""SIGTERM and SIGUSR1 in the trainer (algorithms/preemption.py), on real processes: a SIGTERM far from a step's
end exits at once even while the main thread is blocked in a gloo collective with a peer that never answers
(what keeps a crashed job's survivors alive), one near a step's end is noted and the step finishes; the
end-of-allocation lead is checked against the recipe's estimates at start. Two ranks (actor=megatron, DP 2): a
signal that reaches one rank only stops both at the same step with one complete checkpoint, and torchrun launched
as slurm/common.sh launches it forwards SIGUSR1 and SIGTERM to every rank. Signals go to runs held at a known step
(SDSEARCH_TEST_HOLD), never raced against steps that take milliseconds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_sdsearch.algorithms.preemption import EXIT_TERMINATED, LEAD_ENV, StopRequest, check_signal_lead
from nemo_sdsearch.errors import EXIT_REQUEUE
from nemo_sdsearch.config import ConfigError

BLOCKED = r"""
import datetime, os, signal, sys, time
import torch.distributed as dist
import torch
from nemo_sdsearch.algorithms.preemption import StopRequest
from nemo_sdsearch.errors import EXIT_REQUEUE
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))  # env://
if rank == 1:           # the peer: answers once the file sys.argv[3] exists (never, in the first case)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
    dist.send(torch.ones(1), dst=0)
    time.sleep(5)
    sys.exit(0)
stop = StopRequest(grace_s=20, step_time_s=float(sys.argv[2]))
stop.step_started(0)
print("blocked", flush=True)
dist.recv(torch.zeros(1), src=1)     # in C++, the GIL released: no Python signal handler runs until it returns
print("returned, signal", stop.signum, flush=True)
sys.exit(EXIT_REQUEUE if stop.signum == signal.SIGTERM else 0)
"""


@pytest.fixture
def pair():
    """Start the two processes of BLOCKED (rendezvous through a store this test holds: no port is released and
    bound again), rank 0 blocked in its receive until the peer answers (once the file `answer` exists); both
    killed at the end."""
    from _mp import rendezvous_store

    procs = []
    with rendezvous_store() as env:
        def start(step_time_s: float, answer):
            procs.extend(subprocess.Popen([sys.executable, "-c", BLOCKED, str(r), str(step_time_s), str(answer)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, **env, "WORLD_SIZE": "2", "RANK": str(r)})
                         for r in (0, 1))
            line = procs[0].stdout.readline()
            assert line.strip() == "blocked", procs[0].stderr.read()
            _wait_blocked(procs[0].pid)
            return procs
        try:
            yield start
        finally:
            for p in procs:
                p.kill()
                p.wait()


def _wait_noted(pid: int, sig: int, timeout_s: float = 60.0) -> None:
    """Until the process has taken `sig` (no longer pending for it or any of its threads: its handler ran)."""
    bit = 1 << (int(sig) - 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("SigPnd:", "ShdPnd:")):
                        pending |= int(line.split()[1], 16)
        if not pending & bit:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never took signal {sig}")


def _wait_blocked(pid: int, timeout_s: float = 60.0) -> None:
    """Until the process's main thread sleeps in the kernel (the receive's wait), not running Python code."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "S":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never blocked")


def test_sigterm_far_from_a_step_end_exits_at_once_while_blocked_in_a_collective(pair, tmp_path):
    procs = pair(step_time_s=1000, answer=tmp_path / "never")
    procs[0].send_signal(signal.SIGTERM)
    out, err = procs[0].communicate(timeout=120)  # the collective's timeout is 300 s, and the peer never answers
    assert procs[0].returncode == EXIT_TERMINATED, err
    assert "SIGTERM during step 1" in err and "exiting now without a checkpoint" in err
    assert "returned" not in out
    assert procs[1].poll() is None  # the peer has not answered: the receive never returned


def test_sigterm_near_a_step_end_is_noted_and_the_step_finishes(pair, tmp_path):
    procs = pair(step_time_s=5, answer=tmp_path / "answer")  # the step ends within the 20 s grace
    procs[0].send_signal(signal.SIGTERM)
    _wait_noted(procs[0].pid, signal.SIGTERM)
    (tmp_path / "answer").touch()  # the peer answers: the receive returns, the step ends
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == EXIT_REQUEUE, err
    assert f"returned, signal {int(signal.SIGTERM)}" in out or "returned, signal Signals.SIGTERM" in out, out


def test_the_signal_lead_must_cover_a_step_and_its_checkpoint(monkeypatch):
    monkeypatch.setenv(LEAD_ENV, "300")
    check_signal_lead(200.0, 60.0)   # 260 s fit in 300
    check_signal_lead(None, 60.0)    # no estimate: nothing to check
    with pytest.raises(ConfigError, match=r"trainer.step_time_s.*need 840 s.*300 s before.*--signal=B:USR1@1080"):
        check_signal_lead(600.0, 240.0)
    monkeypatch.delenv(LEAD_ENV)
    check_signal_lead(600.0, 240.0)  # not under a job script that declares a lead


def test_the_trainer_exits_at_once_on_sigterm_mid_step(micro_model_dir, tmp_path):
    """`sdsearch train` with a step estimated at 1000 s: a SIGTERM in step 2 (the run held there until it comes:
    SDSEARCH_TEST_HOLD) ends the process at once (status 143, the step named), with step 1's checkpoint the last
    one."""
    from test_checkpoints import _overrides, _steps, _train_cli, wait_held

    out_dir, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / "train.log"
    hold.mkdir()
    p = _train_cli(_overrides(micro_model_dir[0], out_dir, **{
        "trainer.save_every": 1, "trainer.steps": 4, "trainer.step_time_s": 1000}), hold=(2, hold), log=log)
    try:
        wait_held(p, hold)
        assert _steps(out_dir) == [1]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)  # at once: the held step would never end without the signal
        out = log.read_text()
        assert p.returncode == EXIT_TERMINATED, out[-3000:]
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


# ---------------------------------------------------------------------------------------------------
# Two ranks (actor=megatron, TP1 x DP2, gloo): a signal that reaches one rank, or torchrun
# ---------------------------------------------------------------------------------------------------
DP2 = {"actor": "megatron", "trainer.steps": 3, "trainer.save_every": 0}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# slurm/common.sh's torchrun launch on one node, with srun (sdsearch_srun) replaced by running its command: the
# exports and flags it gives torchrun are what is tested. Port 0: the agent binds a free port and keeps it.
SDSEARCH_TORCHRUN = r"""
source slurm/common.sh
sdsearch_srun() { while [[ $# -gt 0 && "$1" != "--" ]]; do shift; done; shift; exec "$@"; }
export NNODES=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=0 SLURM_JOB_ID=0
sdsearch_torchrun 2 "$@"
"""


def _dp2_direct(model_dir, out_dir, hold, env, **extra) -> list[subprocess.Popen]:
    """Two `sdsearch train` ranks started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, the rendezvous
    of `env`), each with its own exit status and its output in hold/rank<r>.log; held at the start of step
    `hold[0]`."""
    from test_checkpoints import _overrides, _train_cli

    args = _overrides(model_dir, out_dir, **{**DP2, **extra})
    return [_train_cli(args, hold=hold, log=hold[1] / f"rank{r}.log",
                       env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "PYTHONWARNINGS": "ignore"})
            for r in (0, 1)]


def _dp2_torchrun(model_dir, out_dir, hold, log, **extra) -> subprocess.Popen:
    """`sdsearch train` under slurm/common.sh's `sdsearch_torchrun 2` (the Popen is torchrun itself), its output
    and its ranks' in the file `log` (a pipe would stay open as long as any rank lives)."""
    from test_checkpoints import _overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "SDSEARCH_SHUTDOWN_TIMEOUT": "120"}  # then SIGKILL
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PET_SIGNALS_TO_HANDLE",
              "TORCHELASTIC_SIGNALS_TO_HANDLE", "SDSEARCH_TEST_HOLD"):
        env.pop(k, None)
    if hold is not None:
        env["SDSEARCH_TEST_HOLD"] = f"{hold[0]}:{hold[1]}"
    args = _overrides(model_dir, out_dir, **{**DP2, **extra})
    with open(log, "w") as f:
        return subprocess.Popen(["bash", "-c", SDSEARCH_TORCHRUN, "sdsearch-torchrun", "sdsearch", "train", *args],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _end(procs, hold=None, pids=()) -> None:
    """Kill what is left: the processes started here, and the ranks torchrun started (`pids`, and those still
    held in `hold`; torchrun puts each in a session of its own)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    held = [int(f.read_text()) for f in hold.glob("held.*")] if hold is not None else []
    for pid in {*pids, *held}:
        with contextlib.suppress(OSError):  # ended already; only a rank of this test (its run directory named)
            if str(hold.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def _checkpointed(out_dir) -> list[int]:
    """The steps of the complete checkpoints of a megatron run: the loop state and the distributed checkpoint."""
    from test_checkpoints import _steps

    ckpt = out_dir / "checkpoints"
    return [s for s in _steps(out_dir) if (ckpt / f"megatron_step_{s:06d}" / "metadata.json").exists()]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig,to_rank,step_time_s", [(signal.SIGUSR1, 1, 1000), (signal.SIGTERM, 0, 1)],
                         ids=["sigusr1-to-rank1", "sigterm-near-the-step-end-to-rank0"])
def test_a_signal_to_one_rank_stops_both_at_the_same_step(micro_model_dir, tmp_path, sig, to_rank, step_time_s):
    """Two ranks held at the start of step 2; the signal goes to one of them only (SIGTERM with the step
    expected to end within the grace: noted, not an exit), then the other is let go. Both finish step 2, agree
    (one all-reduce) to stop after it, checkpoint it together and exit with EXIT_REQUEUE."""
    from _mp import rendezvous_store
    from test_checkpoints import _rows, wait_held

    out_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    with rendezvous_store() as env:
        procs = _dp2_direct(micro_model_dir[0], out_dir, (2, hold), env, **{"trainer.step_time_s": step_time_s})
        try:
            pids = wait_held(procs, hold, ranks=(0, 1))
            assert pids == {r: p.pid for r, p in enumerate(procs)}
            procs[to_rank].send_signal(sig)
            while (hold / f"held.{to_rank}").exists():  # it left the hold because it took the signal
                assert procs[to_rank].poll() is None, (hold / f"rank{to_rank}.log").read_text()[-3000:]
                time.sleep(0.01)
            assert (hold / f"held.{1 - to_rank}").exists()  # the other one never saw a signal
            (hold / "release").touch()
            for p in procs:
                p.wait(timeout=300)
        finally:
            _end(procs)
    outs = [(hold / f"rank{r}.log").read_text() for r in (0, 1)]
    tail = outs[0][-3000:] + outs[1][-3000:]
    assert [p.returncode for p in procs] == [EXIT_REQUEUE, EXIT_REQUEUE], tail
    said = f"preempted (signal {int(sig)})" if to_rank == 0 else "preempted (signal on another rank)"
    assert f"{said}: step 2 checkpointed" in outs[0], tail  # rank 0 writes the log
    assert [r["step"] for r in _rows(out_dir)] == [1, 2]
    assert _checkpointed(out_dir) == [2]
    assert (out_dir / "checkpoints" / "latest").read_text() == "step_000002"
    assert not (out_dir / "final").exists()


@pytest.mark.timeout(900)
def test_sigusr1_to_torchrun_reaches_every_rank_and_the_job_resumes(micro_model_dir, tmp_path):
    """slurm/common.sh's torchrun gets SIGUSR1 (what srun passes on from the batch script's trap) while its ranks
    are held in step 2: it forwards the signal to both, they checkpoint step 2 and exit with EXIT_REQUEUE on their
    own (torchrun never has to kill them), and the same launch with trainer.resume=true continues from step 2 to
    the end."""
    from test_checkpoints import _rows, wait_held

    out_dir, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / "torchrun.log"
    hold.mkdir()
    p, pids = _dp2_torchrun(micro_model_dir[0], out_dir, (2, hold), log), {}
    try:
        pids = wait_held(p, hold, ranks=(0, 1))
        p.send_signal(signal.SIGUSR1)
        p.wait(timeout=300)
    finally:
        _end([p], hold, pids.values())
    out = log.read_text()
    # torchrun re-raises the signal it forwarded (so it ends non-zero: the batch script requeues on the signal it
    # trapped, not on this status)
    assert p.returncode != 0 and f"got signal: {int(signal.SIGUSR1)}" in out, out[-4000:]
    assert out.count(f"closing signal {signal.SIGUSR1.name}") == 2, out[-4000:]
    assert "forcefully exiting" not in out, out[-4000:]
    assert f"preempted (signal {int(signal.SIGUSR1)}): step 2 checkpointed" in out, out[-4000:]
    assert [r["step"] for r in _rows(out_dir)] == [1, 2] and _checkpointed(out_dir) == [2]

    p = _dp2_torchrun(micro_model_dir[0], out_dir, None, log, **{"trainer.resume": True})
    try:
        p.wait(timeout=600)
    finally:
        _end([p])
    out = log.read_text()
    assert p.returncode == 0, out[-4000:]
    assert "resumed from step 2" in out
    assert [r["step"] for r in _rows(out_dir)] == [1, 2, 3]
    assert (out_dir / "final" / "model.safetensors").exists()


@pytest.mark.timeout(600)
def test_sigterm_to_torchrun_far_from_a_step_end_ends_every_rank_at_once(micro_model_dir, tmp_path):
    """torchrun gets SIGTERM (scancel, preemption) while its ranks are held in step 2, which is expected to take
    1000 s: it forwards the signal, and each rank exits at once with EXIT_TERMINATED, without a checkpoint."""
    from test_checkpoints import _rows, wait_held

    out_dir, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / "torchrun.log"
    hold.mkdir()
    p, pids = _dp2_torchrun(micro_model_dir[0], out_dir, (2, hold), log, **{"trainer.step_time_s": 1000}), {}
    try:
        pids = wait_held(p, hold, ranks=(0, 1))
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=300)
    finally:
        _end([p], hold, pids.values())
    out = log.read_text()
    assert p.returncode != 0 and out.count(f"closing signal {signal.SIGTERM.name}") == 2, out[-4000:]
    assert out.count("SIGTERM during step 2") == 2 and "forcefully exiting" not in out, out[-4000:]
    assert f"status {EXIT_TERMINATED}" in out
    assert [r["step"] for r in _rows(out_dir)] == [1] and _checkpointed(out_dir) == []
