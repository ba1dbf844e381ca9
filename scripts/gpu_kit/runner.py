"""`run` (there; --dry-run here): the checks (CHECKS: name, time limit, what), each in its own process
(`gpu_check.py _check NAME --mode gpu|dry --out DIR`, which lands in `check_main`) and process group, killed at
its limit, all within the budget. The checks themselves are in checks_*.py; report.py writes what `run` prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import ENTRY, RESULT, ROOT, SITE, TRAIN_LR, TRAIN_STEPS, Fail, Skip
from .report import Report, write_header, write_summary
from .wheels import install_wheels

CHECKS = {  # name: (time limit in seconds, what it checks)
    "env": (60, "nvidia-smi, nvcc, Python and package versions, where the carried packages load from"),
    "pytest_gpu": (150, "pytest -m gpu over the test files that carry the marker"),
    "train_hf": (150, f"{TRAIN_STEPS} steps of sdsearch train actor=hf at lr {TRAIN_LR:g}: fp32 master "
                      "weights move"),
    "train_megatron": (180, f"{TRAIN_STEPS} steps of sdsearch train actor=megatron (TP 1, bf16, DDP + "
                            "distributed optimizer) tracking train_hf"),
    "logits": (120, "HF <-> Megatron logits of a Qwen2 0.5B-class model (random weights), fp32 and bf16"),
    "losses": (180, "bench/losses.py at 8,192 x 151,936: dense, chunked, compiled, Liger-Kernel, floor (TARGET)"),
    "generator": (90, "torch-generator tokens/s, the same 0.5B-class model in bf16"),
    "launch": (240, "slurm/train_7b.sh's path on one node: the job's Ray cluster (ray_cluster start/wait, token "
                    "auth), torchrun, 2 steps of actor=megatron generator=trtllm on a 0.5B-class model (the real "
                    "engine: sleep, wake, refit); skipped where Ray or TensorRT-LLM is missing"),
    "memory": (150, "torch.cuda.max_memory_reserved per phase (generation, training) of 2 steps of actor=megatron on "
                    "a 0.5B-class model, next to layout.py's estimate of the same config"),
}


def check_functions() -> dict:
    """name -> fn(mode, out) -> result dict (status pass|warn|fail|skip, reason, figures, skipped, targets)."""
    from .checks_env import check_env, check_pytest_gpu
    from .checks_generation import check_generator, check_launch
    from .checks_losses import check_losses
    from .checks_memory import check_memory
    from .checks_numerics import check_logits
    from .checks_train import check_train

    return {"env": check_env, "pytest_gpu": check_pytest_gpu, "train_hf": lambda m, o: check_train("hf", m, o),
            "train_megatron": lambda m, o: check_train("megatron", m, o), "logits": check_logits,
            "losses": check_losses, "generator": check_generator, "launch": check_launch, "memory": check_memory}


DEPENDS = {"train_megatron": "train_hf"}  # tracks the hf run's metrics


def run_check(name: str, mode: str, out: Path, limit: float, env: dict, emit) -> dict:
    """One check in its own process group, killed (group and all) at `limit` seconds; its lines go to emit."""
    cmd = [sys.executable, str(ENTRY), "_check", name, "--mode", mode, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    result: dict = {}

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT):
                try:
                    result.update(json.loads(line[len(RESULT):]))
                except json.JSONDecodeError:
                    pass
            emit(f"  [{name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    if timed_out:
        result = {**result, "status": "fail", "reason": f"timed out after {limit:.0f} s"}
    elif not result:
        result = {"status": "fail", "reason": f"exited with {rc} before reporting a result"}
    elif rc != 0 and result.get("status") != "fail":
        result = {**result, "status": "fail", "reason": f"exited with {rc}; " + result.get("reason", "")}
    result.update(name=name, seconds=round(seconds, 1), rc=rc)
    return result


def start_order(names: list[str]) -> list[str]:
    """Several checks at a time: the longest chain first (a check's time limit plus those of the checks that wait
    for it, the limits standing for their lengths), so the run does not end on a long chain started last."""
    def chain(n: str) -> float:
        return CHECKS[n][0] + sum(chain(d) for d, on in DEPENDS.items() if on == n and d in names)
    return sorted(names, key=chain, reverse=True)


def run_checks(names: list[str], mode: str, out: Path, env: dict, log: Report, deadline: float, budget: float,
               jobs: int) -> list[dict]:
    """The checks, `jobs` at a time: with one job in the order given, with more in `start_order`; a check starts
    once the one it depends on has ended. With one job the lines stream as they come; with more, each check's
    lines are written together when it ends."""
    results: dict[str, dict] = {}
    pending = list(names) if jobs == 1 else start_order(names)
    cond = threading.Condition()

    def one(name: str) -> dict:
        limit, what = CHECKS[name]
        remaining = deadline - time.perf_counter()
        lines: list[str] = []
        emit = log if jobs == 1 else lines.append
        emit(f"== {name}: {what} (limit {max(0.0, min(limit, remaining)):.0f} s)")
        if remaining < 15:
            res = {"name": name, "status": "skip", "reason": f"out of time ({budget:.0f} s budget)",
                   "seconds": 0.0}
        else:
            res = run_check(name, mode, out, min(limit, remaining), env, emit)
        emit(f"== {name}: {res['status'].upper()} in {res['seconds']:.0f} s" +
             (f" ({res['reason']})" if res.get("reason") else ""))
        for line in lines:
            log(line)
        return res

    def ready() -> str | None:  # under cond: the first pending check whose dependency (if run) has ended
        for name in pending:
            if DEPENDS.get(name) not in names or DEPENDS[name] in results:
                pending.remove(name)
                return name
        return None

    def worker() -> None:
        while True:
            with cond:
                name = ready()
                while name is None and pending:
                    cond.wait()
                    name = ready()
            if name is None:
                return
            res = one(name)
            with cond:
                results[name] = res
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(jobs - 1)]
    for t in threads:
        t.start()
    worker()
    for t in threads:
        t.join()
    return [results[n] for n in names]


def run(args) -> int:
    mode = "dry" if args.dry_run else "gpu"
    out = Path(args.out or os.environ.get("OUT") or (Path(tempfile.gettempdir()) / "sdsearch_gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    names = list(CHECKS)
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in CHECKS]
        if unknown:
            raise SystemExit(f"unknown checks {unknown}; choose from {','.join(CHECKS)}")
    jobs = args.jobs or (2 if mode == "dry" else 1)  # GPU timings are taken one check at a time
    log = Report(out / "report.txt")
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    write_header(log, mode, args.budget, jobs, out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    path = [str(ROOT)]
    if mode == "gpu" and not args.no_install:
        t0 = time.perf_counter()
        install_wheels(Path(args.wheels), SITE)
        log(f"installed {len(list(Path(args.wheels).glob('*.whl')))} wheels from {args.wheels} into {SITE} "
            f"({time.perf_counter() - t0:.0f} s)")
        path.insert(0, str(SITE))
    elif mode == "dry":
        log("dry run: no wheels installed (this interpreter's packages), CPU, tiny shapes, one thread per check")
        # two checks at a time on a small shared CPU: more threads than cores make every process spin
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results = run_checks(names, mode, out, env, log, deadline, args.budget, jobs)
    failed = write_summary(log, mode, results, time.perf_counter() - t_start, args.budget, out)
    return 1 if failed else 0


def check_main(name: str, mode: str, out: Path) -> int:
    """One check, in the process `run_check` started: its result as the last line (RESULT {json})."""
    fns = check_functions()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        res = fns[name](mode, out)
    except Skip as e:
        res = {"status": "skip", "reason": str(e)}
    except Fail as e:
        res = {"status": "fail", "reason": str(e)}
    except Exception as e:  # anything else: the traceback in the report, the check failed
        import traceback

        traceback.print_exc()
        res = {"status": "fail", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    sys.stdout.flush()
    print(RESULT + json.dumps(res, default=str), flush=True)
    return 0 if res["status"] != "fail" else 1
