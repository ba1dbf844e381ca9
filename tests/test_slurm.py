"""The sbatch scripts on a real SLURM cluster on this machine (Debian slurm-wlm + munge; tests/slurm_cluster.py):
two namespaced nodes with their own hostnames and addresses on a private bridge plus a third for the retrieval
service, or one node on localhost where namespaces are not available. shellcheck on every script. Needs root
(to start the daemons and make the namespaces); skips otherwise."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterUnavailable, install, running_cluster, sh

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def test_shellcheck_every_script():
    if not shutil.which("shellcheck"):
        reason = install("shellcheck")
        if reason:
            pytest.skip(reason)
    assert SCRIPTS, "no sbatch scripts"
    p = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    names = {s.name for s in SCRIPTS}
    assert {"train_7b.sh", "train_3b.sh", "retrieval_server.sh", "eval.sh", "convert_to_hf.sh",
            "train_tiny.sh"} <= names


@pytest.fixture(scope="module")
def slurm_cluster():
    """One cluster for every test of this module, torn down (namespaces, bridge, daemons) even on failure."""
    try:
        with running_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as e:
        pytest.skip(str(e))


def _sbatch(args: list[str], env: dict) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().split(";")[0]


def _requeue_when_checkpointed(cluster, job: str, run: Path, timeout_s: int = 600) -> None:
    """`scontrol requeue` (what preemption does) once the run's first checkpoint is complete (its atomic
    `latest` pointer exists). The requeued job starts again on its own: after the credential lifetime
    (cred_expire, 10 s on the test cluster) at the backfill scheduler's next pass (every second there)."""
    latest = run / "checkpoints" / "latest"
    t0 = time.time()
    while not latest.exists():
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} ended {state} before its first checkpoint"
        assert time.time() - t0 < timeout_s, f"no checkpoint after {timeout_s} s"
        time.sleep(1)
    sh(f"scontrol requeue {job}")
    _start_requeued(job)


def _start_requeued(job: str, timeout_s: int = 120) -> None:
    """Start a requeued job (requeued by the test or by its own script) as soon as SLURM allows. It may
    start once its credential lifetime has passed (its EligibleTime; cred_expire is 10 s on the test
    cluster): a node refuses a job whose credential it revoked until then, and the job fails. After that it
    waits for a scheduler pass, minutes for a heterogeneous job; touching its begin time once EligibleTime
    has passed runs that pass at once, and never moves the start before the credential expired."""
    t0, pending = time.time(), False
    while time.time() - t0 < timeout_s:
        info = sh(f"scontrol show job {job}", check=False).stdout
        states = re.findall(r"JobState=(\S+)", info)
        requeued = max(map(int, re.findall(r"Restarts=(\d+)", info)), default=0) >= 1  # (the het leader's)
        if requeued and states and all(s == "PENDING" for s in states):
            pending = True
            eligible = re.findall(r"EligibleTime=(\S+)", info)
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            if eligible and all(e != "Unknown" and e < now for e in eligible):
                sh(f"scontrol update JobId={job} StartTime=now", check=False)
                return
        elif pending:
            return  # it started again (or ended) on its own
        time.sleep(0.5)


TINY = ["trainer.steps=2", "trainer.questions_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16",
        "rollout.max_turns=1", "rollout.max_context=512", "data.dev_questions=2", "data.test_questions=4",
        "trainer.eval_every=0", "trainer.save_every=1", "trainer.final_test_eval=false", "grpo.micro_batch_size=2"]


def _env(tmp_path, **extra) -> dict:
    return {**os.environ, "SDSEARCH_VENV": sys.prefix, "SDSEARCH_LOGS": str(tmp_path / "logs"),
            "SDSEARCH_OUT": str(tmp_path / "run"), **extra}


def test_sbatch_train_tiny_finishes_and_checkpoints(slurm_cluster, tmp_path):
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", "slurm/train_tiny.sh", *TINY], _env(tmp_path))
    state = slurm_cluster.wait(job, 900)
    out = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    logs = list((tmp_path / "logs").glob("*/train.log"))
    detail = out + "".join(l.read_text()[-2000:] for l in logs)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{detail}"
    assert logs and logs[0].parent.name == f"sdsearch-tiny-{job}"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists(), detail
    assert list((tmp_path / "run" / "checkpoints").iterdir()), detail


def test_end_of_allocation_signal_checkpoints_the_running_step_and_the_job_resumes(slurm_cluster, tmp_path):
    """SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@60` sends before the time limit), with no
    periodic checkpoint at all (save_every=0): the trap passes it to the training step, the trainer
    checkpoints the step it was in and exits with status 75, the script requeues the job, and the requeued
    job resumes from that step and completes."""
    overrides = [o for o in TINY if not o.startswith(("trainer.steps", "trainer.save_every"))]
    overrides += ["trainer.steps=4", "trainer.save_every=0"]
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", "slurm/train_tiny.sh", *overrides], _env(tmp_path))
    out_file = tmp_path / f"slurm-{job}.out"

    def detail() -> str:  # the batch output, the trainer's log and the daemons' logs: a post-mortem
        out = out_file.read_text() if out_file.exists() else ""
        logs = list((tmp_path / "logs").glob("*/train.log"))
        return (out[-2000:] + (logs[0].read_text()[-3000:] if logs else "") + "\n"
                + sh(f"scontrol show job {job}", check=False).stdout + slurm_cluster.daemon_logs(40))

    metrics, t0 = tmp_path / "run" / "metrics.jsonl", time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), f"ended before step 1\n{detail()}"
        assert time.time() - t0 < 600, f"no step after 600 s\n{detail()}"
        time.sleep(0.5)
    sh(f"scancel --batch --signal=USR1 {job}")

    t0 = time.time()
    while "Restarts=1" not in sh(f"scontrol show job {job}", check=False).stdout:
        assert time.time() - t0 < 300, f"the job was not requeued after the signal\n{detail()}"
        time.sleep(0.5)
    _start_requeued(job)
    state = slurm_cluster.wait(job, 900)
    out = out_file.read_text() if out_file.exists() else ""
    log = next((tmp_path / "logs").glob("*/train.log")).read_text()
    assert state == "COMPLETED", f"{state}\n{detail()}"
    tail = out[-2000:] + log[-3000:]
    assert "caught SIGUSR1: asking the trainer to checkpoint" in out, tail
    assert "stopped for a signal (status 75): requeueing" in out, tail
    stopped = int(re.search(r"preempted \(signal \d+\): step (\d+) checkpointed", log).group(1))
    assert 1 <= stopped < 4 and f"resumed from step {stopped}" in log, tail
    rows = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()]
    assert rows == [1, 2, 3, 4], tail
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# The two-node job: 2 GRPO steps, 2 questions x 2 rollouts (one question group per data-parallel replica), long
# enough turns that the embedded model's searches reach the retrieval service.
TWO_NODE = ["actor=megatron", "trainer.steps=2", "trainer.questions_per_step=2", "rollout.group_size=2",
            "rollout.max_new_tokens=40", "rollout.max_turns=2", "rollout.max_context=512", "data.dev_questions=2",
            "data.test_questions=4", "trainer.eval_every=0", "trainer.save_every=1", "trainer.final_test_eval=false",
            "grpo.micro_batch_size=2"]


@pytest.fixture
def tiny_index(tmp_path):
    """A BM25 index of the bundled world's training corpus, for the retrieval component."""
    world, index = tmp_path / "world", tmp_path / "index"
    for cmd in ([str(Path(sys.executable).parent / "sdsearch"), "world", "--out", str(world)],
                [sys.executable, "-m", "nemo_sdsearch.retrieval", "build", "--kind", "bm25",
                 "--corpus", str(world / "train_corpus.jsonl"), "--out", str(index)]):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return index


def test_two_node_data_parallel_job_with_retrieval_component_resumes_after_requeue(slurm_cluster, tmp_path,
                                                                                  tiny_index):
    """`sbatch --nodes=2 : --ntasks=1 slurm/train_tiny.sh actor=megatron ...`: torchrun on two nodes (the
    rendezvous of slurm/common.sh; gloo between two network namespaces, so only over the bridge) runs two
    data-parallel replicas, both querying the retrieval service that the heterogeneous job's second
    component serves from a third node; requeued after its first checkpoint, the job starts again on the
    same allocation shape and resumes from that checkpoint."""
    if slurm_cluster.two_nodes_unavailable:
        pytest.skip(f"no two-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    train_nodes, retrieval_node = slurm_cluster.nodes[:2], slurm_cluster.nodes[2]
    env = _env(tmp_path, INDEX_DIR=str(tiny_index))
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", "--nodes=2", "--cpus-per-task=1", ":", "--ntasks=1",
                   "--cpus-per-task=1", "slurm/train_tiny.sh", *TWO_NODE], env)
    _requeue_when_checkpointed(slurm_cluster, job, tmp_path / "run")
    state = slurm_cluster.wait(job, 900)
    out_file = tmp_path / f"slurm-{job}.out"
    out = out_file.read_text() if out_file.exists() else ""
    logs = list((tmp_path / "logs").glob("*/train.log"))
    log = logs[0].read_text() if logs else ""
    detail = f"{out}\n--- train.log\n{log[-4000:]}\n{slurm_cluster.daemon_logs(10)}"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{detail}"

    # the rendezvous: in each run of the job (first and requeued) ranks 0 and 1 of 2, on the two training
    # nodes: two distinct hostnames ("rank 1 of 2 on sdnode2 (node rank 1, local rank 0)")
    ranks = [line.split() for line in log.splitlines() if line.startswith("rank ") and " on " in line]
    assert len(ranks) == 4, detail                            # 2 ranks x (first run + requeued run)
    for run in (ranks[:2], ranks[2:]):
        assert sorted((r[1], r[3]) for r in run) == [("0", "2"), ("1", "2")], detail
        assert {r[5] for r in run} == set(train_nodes), detail
    assert f"rendezvous: {train_nodes[0]}:" in out and "2 node(s)" in out, detail

    # requeued once, resumed from the checkpoint, every step logged once by rank 0
    assert "restart count: 0" in out and "restart count: 1" in out, detail
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 1, detail
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [m["step"] for m in metrics] == [1, 2], metrics
    assert (tmp_path / "run" / "final" / "model.safetensors").exists(), detail

    # the retrieval service: the het component, on its own node, answered the rollouts' searches
    url = f"http://{retrieval_node}:8000"
    served = [line for line in out.splitlines() if line.startswith(f"retrieval service up at {url}:")]
    assert served, detail
    assert int(served[-1].split(", ")[-1].split()[0]) > 0, served   # "..., N queries served" after training
    assert sum(m["env/number_of_valid_search"] for m in metrics) > 0, metrics


RAY_STUBS = r"""
set -euo pipefail
CALLS="$1"; export CALLS
scontrol() { if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-n1\ngpu-n2\n'; fi; }
srun() {  # record the step; run the command of the config probe (everything from `python` on)
    echo "srun $*" >> "$CALLS"
    local a=("$@") i
    for i in "${!a[@]}"; do
        if [[ "${a[$i]}" == python ]]; then "${a[@]:$i}"; return; fi
    done
}
source slurm/common.sh
LOG_DIR="$(dirname "$CALLS")"
SLURM_JOB_NODELIST="gpu-n[1-2]"
echo "generator 7b: $(sdsearch_generator qwen25_7b_sd_search)"
echo "generator tiny: $(sdsearch_generator tiny_cpu)"
sdsearch_ray_cluster 8
wait
echo "RAY_ADDRESS=$RAY_ADDRESS"
"""


def test_ray_cluster_commands_of_common_sh(tmp_path):
    """`sdsearch_ray_cluster` (slurm/common.sh) with srun/scontrol stubbed: a head on the first training node,
    a worker on every other one, all GPUs of each, RAY_ADDRESS exported; `sdsearch_generator` reads the
    generator through the project's config loader (which decides whether the job starts Ray)."""
    calls = tmp_path / "calls.txt"
    p = subprocess.run(["bash", "-c", RAY_STUBS, "stub", str(calls)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO),  # the job's python: this venv's
                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "generator 7b: trtllm" in p.stdout and "generator tiny: torch" in p.stdout
    assert "RAY_ADDRESS=gpu-n1:6379" in p.stdout
    steps = [line for line in calls.read_text().splitlines() if " ray start" in line]
    assert len(steps) == 2, steps
    head, worker = steps
    assert "-w gpu-n1" in head and "--head" in head and "--num-gpus=8" in head and "--block" in head
    assert "-w gpu-n2" in worker and "--address=gpu-n1:6379" in worker and "--num-gpus=8" in worker


def test_process_group_timeout_comes_from_the_environment(monkeypatch):
    """SDSEARCH_DIST_TIMEOUT_MINUTES (what a job script sets) is the timeout of the default process group and of
    Megatron's groups; unset, 30 minutes; a bad value is refused with the variable's name. (The collectives are
    stubbed: what torch and megatron-core do with the timeout they are given is theirs to test.)"""
    pytest.importorskip("megatron.core")
    import datetime

    import torch
    from megatron.core import parallel_state, tensor_parallel

    from nemo_sdsearch.models.megatron.builder import (
        DIST_TIMEOUT_ENV,
        dist_timeout_minutes,
        init_parallel,
    )

    given = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: given.update(default=kw["timeout"]))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel",
                        lambda **kw: given.update(megatron=kw["distributed_timeout_minutes"]))
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: None)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    monkeypatch.setenv(DIST_TIMEOUT_ENV, "7")
    init_parallel(1)
    assert given == {"default": datetime.timedelta(minutes=7), "megatron": 7}
    init_parallel(1, timeout_minutes=2.5)                        # an explicit value wins
    assert given == {"default": datetime.timedelta(minutes=2.5), "megatron": 3}
    monkeypatch.delenv(DIST_TIMEOUT_ENV)
    assert dist_timeout_minutes() == 30.0
    for bad in ("0", "soon", "-1", "inf"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=DIST_TIMEOUT_ENV):
            dist_timeout_minutes()
