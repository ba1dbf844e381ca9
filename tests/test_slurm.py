"""The sbatch scripts on a real SLURM cluster on this machine (Debian slurm-wlm + munge; tests/slurm_cluster.py):
two namespaced nodes with their own hostnames and addresses on a private bridge plus a third for the retrieval
service, or one node on localhost where namespaces are not available. shellcheck on every script. Needs root
(to start the daemons and make the namespaces); skips otherwise.

The cluster path runs here for real except CUDA: the job's Ray cluster (slurm/common.sh: the head on the first
node's IP, a worker on the second, one long-lived step), one TensorRT-LLM engine per data-parallel replica on its
own node's placement bundles (the engine is tests/stand_in's TensorRT-LLM stand-in: Ray actors, shared-memory
refit), SD-Search with a requeue and Search-E1 through every stage, each compared with the single-process run
of the same seeds; and a rank killed in a two-node job."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SUBNET, ClusterUnavailable, install, running_cluster, sh

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
    log_file = next((tmp_path / "logs").glob("*/train.log"))
    log = log_file.read_text()
    assert state == "COMPLETED", f"{state}\n{detail()}"
    assert log_file.parent.name == f"sdsearch-tiny-{job}"      # logs/<job name>-<job id>/
    assert "end-of-allocation signal lead: 60 s" in out
    tail = out[-2000:] + log[-3000:]
    assert "caught SIGUSR1: asking the trainer to checkpoint" in out, tail
    assert "stopped for a signal (status 75): requeueing" in out, tail
    stopped = int(re.search(r"preempted \(signal \d+\): step (\d+) checkpointed", log).group(1))
    assert 1 <= stopped < 4 and f"resumed from step {stopped}" in log, tail
    rows = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()]
    assert rows == [1, 2, 3, 4], tail
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# The two-node jobs: one question group per data-parallel replica (TP 1 x DP 2, a replica per node), long enough
# turns that the embedded model's searches reach the retrieval service. generator=trtllm: the job's Ray cluster,
# one engine per replica (the stand-in), cluster.gpus_per_node=1 (a rank per node; CPU bundles on CPU nodes).
TWO_NODE = ["trainer.questions_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=40", "rollout.max_turns=2",
            "rollout.max_context=512", "data.dev_questions=2", "data.test_questions=4", "trainer.eval_every=0",
            "grpo.micro_batch_size=2", "model.threads=1"]
SD_SEARCH = TWO_NODE + ["trainer.steps=2", "trainer.save_every=1", "trainer.final_test_eval=false"]
SEARCH_E1 = TWO_NODE + ["algorithm=search_e1", "search_e1.adapter=full", "cycles=2", "search_e1.grpo_steps=1",
                        "search_e1.pool_questions=2", "search_e1.pool_samples=2", "search_e1.opsd_steps=1",
                        "search_e1.opsd_pairs_per_step=2", "search_e1.opsd_micro_batch_size=1",
                        "search_e1.opsd_eval_every=1", "trainer.save_every=0", "trainer.final_test_eval=true",
                        "trainer.eval_batch_size=4"]
TRTLLM = ["generator=trtllm", "cluster.gpus_per_node=1"]
ROLLOUT_KEYS = ("critic/score/mean", "critic/advantages/max", "critic/advantages/min", "response_length/mean",
                "response_length/max", "response_length/min", "env/number_of_valid_search", "env/finish_ratio",
                "env/first_query_hit")
STAND_IN = REPO / "tests" / "stand_in"


def _stand_in_env(tmp_path, **extra) -> dict:
    """A job's environment with the TensorRT-LLM stand-in importable (by the trainer and, through the Ray nodes'
    environment, by every Ray worker) and Ray's per-node folders under tmp_path."""
    ray_tmp = tempfile.mkdtemp(prefix="sdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    return _env(tmp_path, PYTHONPATH=f"{STAND_IN}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                SDSEARCH_RAY_TMPDIR=ray_tmp, SDSEARCH_RAY_START_ARGS="--object-store-memory=200000000",
                RAY_USAGE_STATS_ENABLED="0", **extra)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same runs in ONE process (actor=hf, the stand-in engine on a local Ray it starts itself), same seeds:
    what every step of the two-node runs must reproduce. {"sd_search": run dir, "search_e1": run dir}."""
    root = tmp_path_factory.mktemp("single")
    # (Ray starts a local cluster; no token file in the home folder, which a later cluster would pick up)
    env = {**_stand_in_env(root), "SDSEARCH_OUT": "", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    runs = {}
    for name, overrides in (("sd_search", SD_SEARCH), ("search_e1", SEARCH_E1)):
        out = root / name
        p = subprocess.run([str(Path(sys.executable).parent / "sdsearch"), "train", *overrides, *TRTLLM,
                            f"trainer.out_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[name] = out
    return runs


def _rows(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _job_detail(cluster, tmp_path, job: str) -> tuple[str, str, str]:
    """(batch output, train.log, a post-mortem text with both and the daemons' logs)."""
    out_file = tmp_path / f"slurm-{job}.out"
    out = out_file.read_text() if out_file.exists() else ""
    logs = list((tmp_path / "logs").glob("*/train.log"))
    log = logs[0].read_text() if logs else ""
    ray_logs = list((tmp_path / "logs").glob("*/ray.log"))
    ray_log = ray_logs[0].read_text()[-2000:] if ray_logs else ""
    return out, log, f"{out}\n--- train.log\n{log[-5000:]}\n--- ray.log\n{ray_log}\n{cluster.daemon_logs(10)}"


def _two_node_job(cluster, tmp_path, index, overrides) -> str:
    """A two-node generator=trtllm job of train_tiny.sh; with `index`, the retrieval service as a heterogeneous
    component on a third node (the rollouts then search it: rollout.retriever=http); without, in-process BM25
    over the bundled worlds (as the one-process run does)."""
    env = _stand_in_env(tmp_path, **({"INDEX_DIR": str(index)} if index else {}))
    service = [":", "--ntasks=1", "--cpus-per-task=1"] if index else []
    return _sbatch([f"--output={tmp_path}/slurm-%j.out", "--nodes=2", "--cpus-per-task=1", *service,
                    "slurm/train_tiny.sh", "actor=megatron", *overrides, *TRTLLM], env)


def _check_ray_path(out: str, log: str, train_nodes: list[str], runs: int, detail: str) -> None:
    """What every run of a two-node generator=trtllm job must show: a Ray cluster of both training nodes (by IP),
    one placement group created by the job and removed at its end, each replica's engine on its own node."""
    ips = [f"{SUBNET}.{11 + i}" for i in range(2)]  # the nodes' addresses on the test cluster's bridge
    assert out.count(f"ray: 2 node(s) up at {ips[0]}:6379: {ips[0]}, {ips[1]}") == runs, detail
    created = re.findall(r"placement group (sdsearch-\S+) created: 2 bundles", log)
    removed = re.findall(r"placement group (sdsearch-\S+) removed; groups of this job left in Ray: (\d+)", log)
    assert len(created) == runs and [n for n, _ in removed] == created[-len(removed):], detail
    assert removed and all(left == "0" for _, left in removed), detail
    for r, ip in enumerate(ips):  # replica r's engine: one worker, on node r's bundle, reporting node r's address
        lines = re.findall(rf"replica {r}: TensorRT-LLM workers on (\S+) \(placement bundles \[(\d)\]", log)
        assert lines and all(dev == f"CPU-{ip}-0" and int(b) == r for dev, b in lines), (r, lines, detail)
    assert "engine placed through LLM(ray_placement_config=RayPlacementConfig" in log, detail
    assert {f"rank 0 of 2 on {train_nodes[0]}", f"rank 1 of 2 on {train_nodes[1]}"} <= {
        " ".join(line.split()[:6]) for line in log.splitlines() if line.startswith("rank ")}, detail


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


@pytest.mark.timeout(1200)
def test_two_node_sd_search_on_ray_engines_with_a_retrieval_component_resumes_after_requeue(
        slurm_cluster, tmp_path, tiny_index, single_process):
    """`sbatch --nodes=2 : --ntasks=1 slurm/train_tiny.sh actor=megatron generator=trtllm ...`: the job starts a Ray
    cluster over its two training nodes, torchrun runs two data-parallel replicas there (gloo across two network
    namespaces, so only over the bridge), each replica's leader builds its engine on its own node's bundle of the
    job's one placement group and refits it from its rank; every rollout queries the retrieval service that the
    heterogeneous job's second component serves from a third node. Requeued after its first checkpoint, the job
    starts again (a new Ray cluster, a new group) and resumes; every step's rollouts equal the one-process run's."""
    if slurm_cluster.two_nodes_unavailable:
        pytest.skip(f"no two-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    train_nodes, retrieval_node = slurm_cluster.nodes[:2], slurm_cluster.nodes[2]
    job = _two_node_job(slurm_cluster, tmp_path, tiny_index, SD_SEARCH)
    _requeue_when_checkpointed(slurm_cluster, job, tmp_path / "run")
    state = slurm_cluster.wait(job, 900)
    out, log, detail = _job_detail(slurm_cluster, tmp_path, job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{detail}"

    # the rendezvous: in each run of the job (first and requeued) ranks 0 and 1 of 2, on the two training nodes
    ranks = [line.split() for line in log.splitlines() if line.startswith("rank ") and " on " in line]
    assert len(ranks) == 4, detail                            # 2 ranks x (first run + requeued run)
    for run in (ranks[:2], ranks[2:]):
        assert sorted((r[1], r[3]) for r in run) == [("0", "2"), ("1", "2")], detail
        assert {r[5] for r in run} == set(train_nodes), detail
    assert f"rendezvous: {train_nodes[0]}:" in out and "2 node(s)" in out, detail
    # the Ray path, in both runs of the job (the requeued run's first group may end with the job, not the run)
    _check_ray_path(out, log, train_nodes, runs=2, detail=detail)

    # requeued once, resumed from the checkpoint, every step logged once by rank 0
    assert "restart count: 0" in out and "restart count: 1" in out, detail
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 1, detail
    rows = _rows(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2], rows
    assert (tmp_path / "run" / "final" / "model.safetensors").exists(), detail
    # every step's rollouts are the one-process run's (same seeds; replicas split the question groups)
    ref = _rows(single_process["sd_search"])
    for a, b in zip(rows, ref, strict=True):
        assert {k: a[k] for k in ROLLOUT_KEYS} == pytest.approx({k: b[k] for k in ROLLOUT_KEYS}, rel=1e-6), (a, b)

    # the retrieval service: the het component, on its own node, answered the rollouts' searches
    url = f"http://{retrieval_node}:8000"
    served = [line for line in out.splitlines() if line.startswith(f"retrieval service up at {url}:")]
    assert served, detail
    assert int(served[-1].split(", ")[-1].split()[0]) > 0, served   # "..., N queries served" after training
    assert sum(m["env/number_of_valid_search"] for m in rows) > 0, rows


@pytest.mark.timeout(1200)
def test_two_node_search_e1_runs_every_stage_on_one_placement_group(slurm_cluster, tmp_path, single_process):
    """Search-E1 (two cycles of GRPO round, rollout pool, pair mining, full-parameter OPSD; then the final test
    evaluation) as one two-node job on the Ray path: the actor, optimizer, reference and engines are built once
    and every stage runs over them, on ONE placement group that is removed at the end; the pools, the rounds and
    the final test EM equal the one-process run's (retrieval in-process on both sides: the test world's passages
    for the final evaluation)."""
    if slurm_cluster.two_nodes_unavailable:
        pytest.skip(f"no two-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    job = _two_node_job(slurm_cluster, tmp_path, None, SEARCH_E1)
    state = slurm_cluster.wait(job, 900)
    out, log, detail = _job_detail(slurm_cluster, tmp_path, job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{detail}"
    _check_ray_path(out, log, slurm_cluster.nodes[:2], runs=1, detail=detail)
    assert log.count("TensorRT-LLM workers on") == 2, detail   # built once: one engine per replica for all stages

    run, ref = tmp_path / "run", single_process["search_e1"]
    st, ref_st = (json.loads((d / "search_e1_state.json").read_text()) for d in (run, ref))
    assert st["done"] == ["0/grpo", "0/opsd", "1/grpo", "1/opsd"], st
    for cycle in (0, 1):
        pools = [[json.loads(l) for l in (d / f"cycle_{cycle}" / "pool" / "pool.jsonl").read_text().splitlines()]
                 for d in (run, ref)]
        tokens = lambda pool: [(q["question_id"], [t["token_ids"] for t in q["rollouts"]]) for q in pool]
        assert tokens(pools[0]) == tokens(pools[1]), cycle
        assert (run / f"cycle_{cycle}" / "grpo" / "final" / "model.safetensors").exists()
    key = lambda rounds: [(r["cycle"], r["stage"], r["dev_em"], r.get("best_step")) for r in rounds]
    assert key(st["rounds"]) == key(ref_st["rounds"]), (st["rounds"], ref_st["rounds"])
    assert st["final_test"]["all"]["em"] == ref_st["final_test"]["all"]["em"]
    final = Path(st["final_model"])
    assert final.is_absolute() and final.is_relative_to(run) and (final / "model.safetensors").exists(), final


def _rank_process(namespace: str, rank: int) -> int | None:
    """The pid of torchrun's worker of global rank `rank` in a node's network namespace (None: not running)."""
    for pid in map(int, sh(f"ip netns pids {namespace}", check=False).stdout.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and any(c.endswith(b"sdsearch") for c in cmd) and f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.timeout(900)
def test_a_killed_rank_ends_the_two_node_job_with_a_clear_error(slurm_cluster, tmp_path):
    """SIGKILL to rank 1 (on the second node) in the middle of a two-node run: torchrun on that node reports it,
    srun ends the step on the other node, whose rank gets SIGTERM mid-step and exits at once instead of waiting
    out its collective; the job ends FAILED well within the process-group timeout (2 minutes here), and its
    output names the rank, its node and the signal."""
    if slurm_cluster.two_nodes_unavailable:
        pytest.skip(f"no two-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    timeout_s = 120
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", "--nodes=2", "--cpus-per-task=1", "slurm/train_tiny.sh",
                   "actor=megatron", *TWO_NODE, "trainer.steps=200", "trainer.save_every=0",
                   "trainer.final_test_eval=false", f"megatron.dist_timeout_minutes={timeout_s / 60}"],
                  _env(tmp_path))
    metrics, t0 = tmp_path / "run" / "metrics.jsonl", time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            _job_detail(slurm_cluster, tmp_path, job)[2]
        assert time.time() - t0 < 600, "no step after 600 s"
        time.sleep(0.5)
    pid = _rank_process(slurm_cluster.nodes[1], 1)
    assert pid is not None, sh(f"ip netns pids {slurm_cluster.nodes[1]}", check=False).stdout
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    state = slurm_cluster.wait(job, timeout_s + 60)
    took = time.time() - killed
    out, log, detail = _job_detail(slurm_cluster, tmp_path, job)
    assert state == "FAILED" and took < timeout_s, f"{state} after {took:.0f} s\n{detail}"
    assert "the training step failed (status" in out, detail
    root = out[out.index("the training step failed"):]
    assert re.search(rf"host\s*:\s*{slurm_cluster.nodes[1]}", root) and re.search(r"rank\s*:\s*1\b", root), detail
    assert "Signal 9 (SIGKILL)" in root, detail


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
