"""Preemption without loss, and no lingering after a failure: what the trainer does with SIGUSR1 and SIGTERM.

- **SIGUSR1** is SLURM's end-of-allocation warning (`#SBATCH --signal=B:USR1@<lead>`): slurm/common.sh forwards
  it to the job step, torchrun forwards it to every rank, and every rank's `StopRequest` notes it. After the
  step that is running, the ranks agree (one all-reduce: a signal reaches the ranks at slightly different
  times, and they must stop at the same step), write a checkpoint of that step and exit with `EXIT_REQUEUE`,
  which tells the script to requeue the job; the requeued job resumes from that checkpoint. The lead must
  cover a step and its checkpoint: `check_signal_lead` compares it at start with the recipe's estimates
  (`trainer.step_time_s`, `trainer.checkpoint_time_s`) and refuses a job that could not make it.
- **SIGTERM** is preemption, `scancel`, or torchrun stopping the surviving ranks after one of them crashed.
  A rank blocked in a collective with a dead peer never returns to Python (NCCL waits out its timeout), so a
  Python handler alone would keep it, and the whole job, alive for up to the process-group timeout. A
  watcher thread (woken through `signal.set_wakeup_fd`, which works while the main thread is stuck in C)
  decides at once: when the running step is expected to end within `trainer.sigterm_grace_s` (by the longer
  of the recipe's estimate `trainer.step_time_s` and the mean of the last steps), the signal is noted and
  handled as SIGUSR1 is; otherwise (or with no estimate at all) the process says why and exits with
  `EXIT_TERMINATED` immediately, losing only the step in flight.

Tests deliver their signals at a known step through `SDSEARCH_TEST_HOLD` (`StopRequest.step_started`); it is unset
in every real run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

EXIT_TERMINATED = 143  # 128 + SIGTERM, as the default action would exit
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
LEAD_ENV = "SDSEARCH_SIGNAL_LEAD_S"  # set by slurm/common.sh from the script's #SBATCH --signal=...@<lead>
HOLD_ENV = "SDSEARCH_TEST_HOLD"     # test-only: "<step>:<dir>" (see StopRequest.step_started)


def signal_lead_s() -> float | None:
    """Seconds between the end-of-allocation signal and the time limit, as the job script declares them."""
    value = os.environ.get(LEAD_ENV, "").strip()
    try:
        lead = float(value)
    except ValueError:
        return None
    return lead if lead > 0 and math.isfinite(lead) else None


def check_signal_lead(step_time_s: float | None, checkpoint_time_s: float | None) -> None:
    """Refuse (ConfigError) a job whose end-of-allocation signal comes too late to finish a step and write its
    checkpoint; nothing to check outside such a job or without an estimate."""
    from nemo_sdsearch.errors import ConfigError

    lead = signal_lead_s()
    if lead is None or step_time_s is None:
        return
    need = step_time_s + (checkpoint_time_s or 0.0)
    if lead < need:
        suggest = int(math.ceil(need * 1.25 / 60.0) * 60)
        raise ConfigError(f"config key trainer.step_time_s: a step (~{step_time_s:.0f} s) and its checkpoint "
                          f"(~{checkpoint_time_s or 0:.0f} s, trainer.checkpoint_time_s) need {need:.0f} s after the "
                          f"end-of-allocation signal, but the job sends it {lead:.0f} s before its time limit "
                          f"(#SBATCH --signal=B:USR1@{lead:.0f}): submit with --signal=B:USR1@{suggest} and "
                          f"{LEAD_ENV}={suggest}, or correct the estimates")


class StopRequest:
    """Notes SIGUSR1 / SIGTERM for the training loop, and exits at once on a SIGTERM that is not near a step
    boundary (see the module docstring). Handlers are installed from the main thread only; elsewhere it
    never fires. The loop calls `step_started()` / `step_finished()` around each step."""

    def __init__(self, signals=SIGNALS, grace_s: float = 20.0, step_time_s: float | None = None, say=None):
        self.signum: int | str | None = None  # the signal; "on another rank" once agreed on a rank that had none
        self.grace_s, self.step_time_s = float(grace_s), step_time_s
        self.durations: list[float] = []
        self.step: int | None = None
        self.started: float | None = None
        self.at_boundary = False
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._old: dict = {}
        self._wakeup = None
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._old[s] = signal.signal(s, self._note)
            if signal.SIGTERM in signals:
                r, w = os.pipe()
                os.set_blocking(w, False)
                self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
                threading.Thread(target=self._watch, args=(r,), name="sigterm-watcher", daemon=True).start()

    # -- the loop's side --------------------------------------------------------------------------------
    def step_started(self, step: int) -> None:
        self.step, self.started, self.at_boundary = step, time.monotonic(), False
        hold = os.environ.get(HOLD_ENV)
        if hold and int(hold.split(":", 1)[0]) == step + 1:
            self._hold(hold.split(":", 1)[1])

    def _hold(self, folder: str, timeout_s: float = 600.0) -> None:
        """Test hook (SDSEARCH_TEST_HOLD=<n>:<dir>): at the start of step n (counted from 1, as metrics.jsonl
        counts) this rank writes its pid to <dir>/held.<RANK> and waits until a signal is noted or <dir>/release
        exists, then removes the file. A test sends its signal to a run held there, mid-step at a known step,
        instead of racing steps that take milliseconds; it knows a rank took the signal when its file is gone."""
        from pathlib import Path

        from nemo_sdsearch.core.files import atomic_write_text

        rank = os.environ.get("RANK", "0")
        held, release = Path(folder) / f"held.{rank}", Path(folder) / "release"
        atomic_write_text(held, str(os.getpid()), tmp_name=f".held.{rank}.tmp")
        deadline = time.monotonic() + timeout_s
        while self.signum is None and not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        held.unlink()

    def step_finished(self) -> None:
        """The step's work is done; until the next `step_started` the loop is at a boundary (it agrees on a stop
        and checkpoints): a SIGTERM there is noted, never an exit."""
        if self.started is not None:
            self.durations.append(time.monotonic() - self.started)
        self.step = self.started = None
        self.at_boundary = True

    def outside_steps(self) -> None:
        """After the last step (final evaluation and weights): a SIGTERM exits at once."""
        self.step = self.started = None
        self.at_boundary = False

    def seconds_to_boundary(self) -> float | None:
        """How long the running step is expected to take still (0 at a boundary; None outside the steps, or
        with no estimate)."""
        if self.at_boundary:
            return 0.0
        if self.started is None:
            return None
        recent = self.durations[-5:]
        measured = sum(recent) / len(recent) if recent else None
        known = [x for x in (measured, self.step_time_s) if x is not None]
        if not known:
            return None
        expected = max(known)  # the longer of the estimate and the measured mean: never stay on a guess
        return max(0.0, expected - (time.monotonic() - self.started))

    def agreed(self, actor) -> bool:
        """Collective: True on every rank when any rank was signalled (a rank that was not says so in `signum`)."""
        stop = actor.any_rank(self.signum is not None)
        if stop and self.signum is None:
            self.signum = "on another rank"
        return stop

    # -- the signals' side ------------------------------------------------------------------------------
    def _note(self, signum, frame) -> None:
        self.signum = signum

    def _watch(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self._on_sigterm()

    def _on_sigterm(self) -> None:
        eta = self.seconds_to_boundary()
        if eta is not None and eta <= self.grace_s:
            self.signum = signal.SIGTERM  # (the Python handler notes it too, once the main thread runs again)
            return
        where = (f"during step {self.step + 1}, {time.monotonic() - self.started:.0f} s into it"
                 if self.started is not None else "outside a training step")
        expected = "" if eta is None else f", about {eta:.0f} s before its end"
        self.say(f"SIGTERM {where}{expected}: not within trainer.sigterm_grace_s={self.grace_s:.0f} s of a step "
                 f"boundary, so exiting now without a checkpoint (status {EXIT_TERMINATED}); a requeued job resumes "
                 "from the last checkpoint")
        os._exit(EXIT_TERMINATED)

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        if self._wakeup is not None:
            r, w, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            os.close(w)
            os.close(r)
            self._wakeup = None
