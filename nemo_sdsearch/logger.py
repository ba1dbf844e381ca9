"""Where the metrics of `sdsearch train` go: one `MetricsLogger` interface, one backend per entry of
`logger.backends` (conf/tiny_cpu.yaml documents the keys; the README's Metrics section every name).

    loggers = build_loggers(cfg, out_dir, console, rank0=..., live=..., start_step=...)
    with loggers:                        # starts the progress bar (console on a terminal); closes every backend
        loggers.log(step, row)           # a training step's metrics
        loggers.log_eval(step, metrics)  # an evaluation's metrics (val/dev_em, val/test_em, ...)

Backends:
- console: one plain line per step and per evaluation whenever the console is not a terminal (a SLURM log,
  `> log 2>&1`), flushed at once; on a terminal the rich progress bar, with a line per evaluation above it.
- tensorboard: `out_dir/tensorboard`, one scalar per metric name.
- wandb, mlflow: optional extras (`pip install -c constraints.txt -e '.[wandb]'`, `'.[mlflow]'`), imported only
  when named; `check_backends` refuses a missing one before any model is loaded.
metrics.jsonl is not a backend: the recipe always writes it (a resumed run truncates it to its checkpoint).

A resumed run (trainer.resume=true: a requeued SLURM job) logs into the SAME W&B / MLflow run: each checkpoint
stores `MetricsLoggers.run_ids()` ({"wandb": id, "mlflow": id}) and `build_loggers(..., run_ids=...)` reopens them
(W&B: `wandb.init(id=..., resume="allow")`; MLflow: the run set RUNNING again); a fresh run (no checkpoint,
trainer.overwrite=true) opens new ones. A run stopped for a requeue ends its backends' run as preempted (MLflow
KILLED), an error as failed, the end of training as finished. The steps a hard kill lost after the last
checkpoint are trained and logged again: TensorBoard purges the old events, metrics.jsonl drops the old rows,
MLflow keeps both points of such a step in the history and W&B keeps the first (its history only moves
forward); a signalled stop (preemption, USR1 before the time limit) checkpoints its last step, so nothing is
logged twice.
Only rank 0 logs; the other ranks hold an empty `MetricsLoggers`. Values that are not finite numbers (NaN
`sd/jsd` under algorithm=grpo) go to metrics.jsonl only; booleans are logged as 0 / 1.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from nemo_sdsearch.errors import ConfigError, Preempted

BACKENDS = ("console", "tensorboard", "wandb", "mlflow")
OPTIONAL = {"wandb": "wandb", "mlflow": "mlflow"}  # backend -> the module its extra installs


def check_backends(backends) -> None:
    """Refuse, naming the install command, a backend whose optional package is not installed."""
    for name in backends:
        module = OPTIONAL.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key logger.backends: {name} is not installed; install it with "
                              f"pip install -c constraints.txt -e '.[{name}]' or remove {name} from logger.backends")


def scalars(metrics: dict) -> dict[str, float]:
    """The values a scalar backend takes: finite numbers (booleans as 0 / 1); `step` itself is the x axis."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


FINISHED, PREEMPTED, FAILED = "FINISHED", "KILLED", "FAILED"   # how a run ends (MLflow's run statuses)


class MetricsLogger:
    """One backend. `log` takes a training step's metrics, `log_eval` an evaluation's, both keyed by the
    names of the README's Metrics section; `close` ends the run on the backend (flushes, finishes) with a
    status (FINISHED, PREEMPTED: stopped for a requeue, FAILED). `run_id`: the backend's run (W&B, MLflow),
    stored with each checkpoint so that a resumed run reopens it; None for the others."""

    run_id: str | None = None

    def log(self, step: int, metrics: dict) -> None:
        raise NotImplementedError

    def log_eval(self, step: int, metrics: dict) -> None:
        self.log(step, metrics)

    def start(self) -> None:
        pass

    def close(self, status: str = FINISHED) -> None:
        pass


class ConsoleLogger(MetricsLogger):
    # the metrics of a step line, in this order (those a row holds as finite numbers)
    LINE_KEYS = ("critic/score/mean", "env/number_of_valid_search", "env/first_query_hit", "env/finish_ratio",
                 "response_length/mean", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "sd/jsd", "sd/agreement",
                 "actor/grad_norm", "timing_s/step")
    # the short labels of the progress bar's info column
    BAR_KEYS = (("critic/score/mean", "score"), ("env/number_of_valid_search", "searches"),
                ("env/first_query_hit", "first-query hit"), ("sd/jsd", "jsd"))

    def __init__(self, console, total_steps: int, description: str, start_step: int = 0, live: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.total = console, total_steps
        self.t0 = time.perf_counter()
        self.dev = ""
        # the live bar draws nothing into a file: a SLURM log or a redirected stdout gets plain lines instead
        self.progress = None
        if live and console.is_terminal:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
            self.task = self.progress.add_task(description, total=total_steps, completed=start_step, info="")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)  # one line, never wrapped
        getattr(self.console.file, "flush", lambda: None)()

    def _elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def log(self, step: int, metrics: dict) -> None:
        if self.progress is not None:
            info = " ".join(f"{label} {metrics[k]:.3g}" for k, label in self.BAR_KEYS
                            if k in metrics and math.isfinite(metrics[k]))
            self.progress.update(self.task, completed=step, info=info + self.dev)
            return
        shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in self.LINE_KEYS
                         if k in metrics and not (isinstance(metrics[k], float) and math.isnan(metrics[k])))
        self._line(f"step {step}/{self.total} {shown} elapsed={self._elapsed()}")

    def log_eval(self, step: int, metrics: dict) -> None:
        self._line(f"eval step {step}/{self.total} " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()
                                                                  if k != "step"))
        if "val/dev_em" in metrics:
            self.dev = f" dev_em {metrics['val/dev_em']:.3f}"

    def start(self) -> None:
        if self.progress is not None:
            self.progress.start()

    def close(self, status: str = FINISHED) -> None:
        if self.progress is not None:
            self.progress.stop()


class TensorBoardLogger(MetricsLogger):
    def __init__(self, log_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events of steps after its checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str = FINISHED) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    """`run_id`: continue that run (`resume="allow"`: W&B creates it if it does not exist; offline, a second
    `offline-run-*-<id>` folder that `wandb sync` uploads into the same run)."""

    def __init__(self, project: str, name: str, config: dict, mode: str, directory: Path,
                 run_id: str | None = None):
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or directory)
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = {"project": project, "name": name, "config": config, "dir": str(directory)}
        if mode != "auto":   # auto: wandb's own choice (WANDB_MODE, else online)
            kwargs["mode"] = mode
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.Error as e:
            raise ConfigError(f"config key logger.wandb_mode: wandb.init failed ({str(e).strip().splitlines()[0]}); "
                              "log in (WANDB_API_KEY) or set logger.wandb_mode=offline") from None
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self, status: str = FINISHED) -> None:
        if status == PREEMPTED:
            try:
                self.run.mark_preempting()   # the W&B UI shows the run as preempted, not crashed
            except Exception:  # noqa: BLE001 - a status hint only (not every mode supports it)
                pass
        self.run.finish(exit_code=0 if status == FINISHED else 1)


def mlflow_tracking_uri(configured: str | None, out_dir: Path) -> str:
    """logger.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a file store in out_dir/mlruns."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or (Path(out_dir) / "mlruns").resolve().as_uri()


class MLflowLogger(MetricsLogger):
    """Through `MlflowClient` (no process-global active run: one process may train several runs, as the
    ablation does). MLflow keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE; a run
    that names no server writes one, so the variable is set for file stores (a server or database URI is
    used as given)."""

    def __init__(self, project: str, name: str, params: dict, tracking_uri: str, run_id: str | None = None):
        from mlflow import MlflowClient

        if urlparse(tracking_uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        logged: dict = {}
        if run_id and self._exists(run_id):   # a resumed run: the same MLflow run, running again
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            logged = self.client.get_run(run_id).data.params
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        # MLflow refuses to change a logged parameter: a resumed run logs only the keys new to the run (its
        # trainer.resume=true and any other changed value stay as the first attempt logged them)
        self._log_params({k: v for k, v in params.items() if k not in logged})

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:  # not in this tracking store (another logger.mlflow_tracking_uri): a new run
            return False

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):   # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in scalars(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def close(self, status: str = FINISHED) -> None:
        self.client.set_terminated(self.run_id, status=status)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"rollout": {"topk": 3}} -> {"rollout.topk": 3} (config keys as the overrides spell them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLoggers(MetricsLogger):
    """The backends of one run, side by side. A context manager: entering starts the console's progress bar,
    leaving closes every backend (also on an error); `close` may be called earlier, once or more."""

    def __init__(self, backends: list[MetricsLogger]):
        self.backends, self.closed = backends, False

    def log(self, step: int, metrics: dict) -> None:
        for b in self.backends:
            b.log(step, metrics)

    def log_eval(self, step: int, metrics: dict) -> None:
        for b in self.backends:
            b.log_eval(step, metrics)

    def start(self) -> None:
        for b in self.backends:
            b.start()

    def run_ids(self) -> dict[str, str]:
        """{backend name: its run id} of the backends that have runs (wandb, mlflow): what a checkpoint
        stores so that a resumed run logs into the same runs."""
        names = {WandbLogger: "wandb", MLflowLogger: "mlflow"}
        return {names[type(b)]: b.run_id for b in self.backends if type(b) in names and b.run_id}

    def close(self, status: str = FINISHED) -> None:
        if not self.closed:
            self.closed = True
            for b in self.backends:
                b.close(status)

    def __enter__(self) -> "MetricsLoggers":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:

        self.close(FINISHED if exc_type is None else PREEMPTED if issubclass(exc_type, Preempted) else FAILED)


def build_loggers(cfg, out_dir: Path, console, rank0: bool = True, live: bool = True,
                  start_step: int = 0, run_ids: dict | None = None) -> MetricsLoggers:
    """The backends of `cfg.logger.backends` for a run writing into `out_dir` (rank 0 only; others get none).
    `live=False` turns the progress bar off (plain lines instead). `run_ids`: the runs a resumed run continues
    (`MetricsLoggers.run_ids()` as its checkpoint stored them); a backend without one opens a new run."""
    if not rank0:
        return MetricsLoggers([])
    from nemo_sdsearch.config import to_dict

    lg, out_dir = cfg.logger, Path(out_dir)
    check_backends(lg.backends)
    name = lg.run_name or cfg.trainer.out_dir
    made: list[MetricsLogger] = []
    run_ids = run_ids or {}
    for backend in dict.fromkeys(lg.backends):   # in the order given, each once
        if backend == "console":
            made.append(ConsoleLogger(console, cfg.trainer.steps, cfg.algorithm, start_step, live))
        elif backend == "tensorboard":
            made.append(TensorBoardLogger(out_dir / "tensorboard", start_step))
        elif backend == "wandb":
            made.append(WandbLogger(lg.project, name, to_dict(cfg), lg.wandb_mode, out_dir, run_ids.get("wandb")))
        elif backend == "mlflow":
            made.append(MLflowLogger(lg.project, name, flatten(to_dict(cfg)),
                                     mlflow_tracking_uri(lg.mlflow_tracking_uri, out_dir), run_ids.get("mlflow")))
        else:
            raise ConfigError(f"config key logger.backends: unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    return MetricsLoggers(made)
