"""Preemption without loss: SIGUSR1 / SIGTERM ask the trainer to stop after the step it is running.

SLURM sends the batch script SIGUSR1 shortly before the time limit (`#SBATCH --signal=B:USR1@...`) and
SIGTERM on preemption; slurm/common.sh forwards it to the job step, torchrun forwards it to every rank
(`--signals-to-handle`), and every rank's `StopRequest` notes it. After each step the ranks agree (one
all-reduce: a signal reaches the ranks at slightly different times, and they must stop at the same step),
write a checkpoint of that step, and exit with `EXIT_REQUEUE`, which tells the script to requeue the job;
the requeued job resumes from that checkpoint (trainer.resume=true).
"""

from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 75   # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the checkpoint of a preempted step is written; exits the process with EXIT_REQUEUE."""

    def __init__(self, step: int):
        super().__init__(EXIT_REQUEUE)
        self.step = step


class StopRequest:
    """Notes SIGUSR1 / SIGTERM (handlers installed from the main thread; elsewhere it never fires)."""

    def __init__(self, signals=SIGNALS):
        self.signum: int | None = None
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._old[s] = signal.signal(s, self._note)

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, actor) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        return actor.any_rank(self.signum is not None)

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
