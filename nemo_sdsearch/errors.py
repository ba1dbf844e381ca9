"""Errors a user can cause, and the exit of a preempted run, shared by the modules that detect or report them (no
imports: any module may use them)."""

EXIT_REQUEUE = 75      # EX_TEMPFAIL: "try again later" (slurm/common.sh requeues the job on it)


class ConfigError(ValueError):
    """A bad config: the message names the key (`config key K: ...`) and the fix."""


class Preempted(SystemExit):
    """Raised after the checkpoint of a preempted step is written (algorithms/preemption.py); exits the process with
    EXIT_REQUEUE. The loggers close a run that ends with it as preempted, not failed."""

    def __init__(self, step: int):
        super().__init__(EXIT_REQUEUE)
        self.step = step
