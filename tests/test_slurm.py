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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterUnavailable, free_port, missing, running_cluster, sh

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def test_shellcheck_every_script():
    reason = missing(["shellcheck"])
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


def test_end_of_allocation_signal_checkpoints_the_running_step_and_the_job_resumes(slurm_cluster, tmp_path,
                                                                                  monkeypatch):
    """SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@60` sends before the time limit), with no
    periodic checkpoint at all (save_every=0): the trap passes it to the training step, the trainer
    checkpoints the step it was in and exits with status 75, the script requeues the job, and the requeued
    job resumes from that step and completes. With logger.backends=[console,mlflow] (MLflow's default file store
    in the run directory) both attempts log into ONE MLflow run: the checkpoint stores its id."""
    overrides = [o for o in TINY if not o.startswith(("trainer.steps", "trainer.save_every"))]
    overrides += ["trainer.steps=4", "trainer.save_every=0", "logger.backends=[console,mlflow]"]
    env = {k: v for k, v in _env(tmp_path).items() if k != "MLFLOW_TRACKING_URI"}
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", "slurm/train_tiny.sh", *overrides], env)
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
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], tail
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    # one MLflow run for both attempts: steps 1..stopped logged before the requeue, the rest after, each once
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("nemo_sdsearch").experiment_id])
    assert run.info.status == "FINISHED" and f"logging into the same runs: mlflow {run.info.run_id}" in log, tail
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "critic/score/mean"))
    assert history == [(r["step"], pytest.approx(r["critic/score/mean"])) for r in rows], (history, tail)


# The two-node jobs: one question group per data-parallel replica (TP 1 x DP 2, a replica per node), long enough
# turns that the embedded model's searches reach the retrieval service. generator=trtllm: the job's Ray cluster,
# one engine per replica (the stand-in), cluster.gpus_per_node=1 (a rank per node; CPU bundles on CPU nodes).
TWO_NODE = ["trainer.questions_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=40", "rollout.max_turns=2",
            "rollout.max_context=512", "data.dev_questions=2", "data.test_questions=4", "trainer.eval_every=0",
            "grpo.micro_batch_size=2", "model.threads=1"]
SD_SEARCH = TWO_NODE + ["trainer.steps=2", "trainer.save_every=1", "trainer.final_test_eval=false"]
SEARCH_E1 = TWO_NODE + ["algorithm=search_e1", "search_e1.adapter=full", "search_e1.cycles=2", "search_e1.grpo_steps=1",
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
    # both at once (one thread each: the two cores), each on the local Ray cluster it starts; output to files
    procs = {}
    for name, overrides in (("sd_search", SD_SEARCH), ("search_e1", SEARCH_E1)):
        with open(root / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([str(Path(sys.executable).parent / "sdsearch"), "train", *overrides,
                                            *TRTLLM, f"trainer.out_dir={root / name}"], cwd=REPO, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, p in procs.items():
            assert p.wait(timeout=900) == 0, f"{name}:\n{(root / f'{name}.log').read_text()[-5000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {name: root / name for name in procs}


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


def _check_ray_path(cluster, out: str, log: str, runs: int, detail: str) -> None:
    """What every run of a two-node generator=trtllm job must show: a Ray cluster of both training nodes (by IP),
    one placement group created by the job and removed at its end, each GPU's engine (engine TP 1) on its own node."""
    train_nodes = cluster.nodes[:2]
    ips = [cluster.addrs[n] for n in train_nodes]  # the nodes' addresses on the test cluster's bridge
    assert out.count(f"ray: 2 node(s) up at {ips[0]}:6379: {ips[0]}, {ips[1]}") == runs, detail
    created = re.findall(r"placement group (sdsearch-\S+) created: 2 bundles", log)
    removed = re.findall(r"placement group (sdsearch-\S+) removed; groups of this job left in Ray: (\d+)", log)
    assert len(created) == runs and [n for n, _ in removed] == created[-len(removed):], detail
    assert removed and all(left == "0" for _, left in removed), detail
    for r, ip in enumerate(ips):  # engine r (rank r's: engine TP 1): one worker, on node r's bundle, node r's address
        lines = re.findall(rf"engine {r} \(ranks {r}-{r}\): TensorRT-LLM workers on (\S+) \(placement bundles \[(\d)\]",
                           log)
        assert lines and all(dev == f"CPU-{ip}-0" and int(b) == r for dev, b in lines), (r, lines, detail)
    assert "engine placed through LLM(ray_placement_config=RayPlacementConfig" in log, detail
    assert {f"rank 0 of 2 on {train_nodes[0]}", f"rank 1 of 2 on {train_nodes[1]}"} <= {
        " ".join(line.split()[:6]) for line in log.splitlines() if line.startswith("rank ")}, detail


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """The bundled world as FlashRAG files (`sdsearch world --out`: train/dev/test questions and corpora) and a BM25
    index of its training corpus: (world dir, index dir)."""
    root = tmp_path_factory.mktemp("tiny_world")
    world, index = root / "world", root / "index"
    for cmd in ([str(Path(sys.executable).parent / "sdsearch"), "world", "--out", str(world)],
                [sys.executable, "-m", "nemo_sdsearch.retrieval", "build", "--kind", "bm25",
                 "--corpus", str(world / "train_corpus.jsonl"), "--out", str(index)]):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return world, index


@pytest.fixture
def tiny_index(tiny_world):
    """A BM25 index of the bundled world's training corpus, for the retrieval component."""
    return tiny_world[1]


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
    _check_ray_path(slurm_cluster, out, log, runs=2, detail=detail)

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
    _check_ray_path(slurm_cluster, out, log, runs=1, detail=detail)
    assert log.count("TensorRT-LLM workers on") == 2, detail   # built once: one engine per GPU for all stages

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


# --------------------------------------------------------------------------------------------------------------------
# The cluster path of docs/cluster.md, every script of it executed on CPU nodes: slurm/retrieval_server.sh serves an
# index, slurm/train_3b.sh trains against it (RETRIEVAL_URL), slurm/convert_to_hf.sh converts that run's Megatron
# checkpoint, slurm/eval.sh evaluates the run through the service, slurm/train_7b.sh trains on two nodes with the
# service as its own heterogeneous component (INDEX_DIR). The GPU scripts run unchanged: sbatch options replace the
# GPU #SBATCH lines, GPUS_PER_NODE=1 gives one rank per node, and `key=value` overrides shrink the recipes
# (conf/qwen25_*.yaml) to the embedded tiny model on CPU (docs/cluster.md, "The GPU scripts on CPU").
# --------------------------------------------------------------------------------------------------------------------
# sbatch options for the GPU scripts' #SBATCH lines on the test cluster (2 CPUs and 1 GiB a node, no GPUs):
# the training component, then the retrieval component of train_{3b,7b}.sh's heterogeneous job
ON_CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe"]
HET_ON_CPU = [":", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=100M"]
JOB_ENV = ("RUN", "MODEL", "MODEL_DIR", "INSTRUCTION", "CHAT_TEMPLATE", "MAX_NEW_TOKENS", "MAX_CONTEXT", "MAX_TURNS",
           "TOPK", "EM", "EVAL_ARGS", "RETRIEVAL_URL", "RETRIEVAL_PORT", "INDEX_DIR", "FAISS_INDEX", "GPUS_PER_NODE",
           "CONTAINER_IMAGE")


def _model_dir() -> Path:
    from nemo_sdsearch.world.assets import default_model_dir

    return Path(default_model_dir())


def _recipe_on_cpu(world: Path) -> list[str]:
    """The overrides that run a Qwen2.5 recipe on CPU nodes with the embedded tiny model (MODEL_DIR): CPU device,
    the torch generator, no tensor / sequence parallelism, fp32, the model's own architecture (the layout check and
    memory estimate run on it), the bundled world's FlashRAG files, and a budget of one small step. Everything
    else is the recipe's: SD-Search, the Megatron actor, Search-R1's prompt, the http retriever, lr, KL, clip."""
    hf = json.loads((_model_dir() / "config.json").read_text())
    return ["model.device=cpu", "model.threads=1", "generator=torch", "megatron.tensor_parallel=1",
            "trtllm.tensor_parallel=1", "megatron.sequence_parallel=false", "megatron.distributed_optimizer=false",
            "megatron.dtype=fp32", f"arch.hidden_size={hf['hidden_size']}", f"arch.num_layers={hf['num_hidden_layers']}",
            f"arch.num_attention_heads={hf['num_attention_heads']}", f"arch.num_kv_heads={hf['num_key_value_heads']}",
            f"arch.ffn_hidden_size={hf['intermediate_size']}", f"arch.vocab_size={hf['vocab_size']}",
            f"arch.tied_embeddings={str(hf['tie_word_embeddings']).lower()}",
            f"data.train_files=[{world}/train.jsonl]", f"data.dev_files=[{world}/dev.jsonl]",
            f"data.test_files=[{world}/dev.jsonl]", "data.dev_questions=2", "data.test_questions=4",
            "rollout.group_size=2", "rollout.max_turns=2", "rollout.max_new_tokens=40", "rollout.max_context=512",
            "trainer.questions_per_step=2", "trainer.steps=1", "trainer.save_every=1", "trainer.eval_every=0",
            "trainer.final_test_eval=false", "grpo.micro_batch_size=2", "grpo.mini_batches=1", "sd.compile=false",
            "logger.backends=[console]"]


def _job_env(tmp_path, **extra) -> dict:
    env = _env(tmp_path, **extra)
    for key in JOB_ENV:
        if key not in extra:
            env.pop(key, None)
    return env


def _run_job(cluster, tmp_path, args: list[str], env: dict, timeout_s: int = 300) -> tuple[str, str, str]:
    """sbatch, wait for the end: (job id, final state, batch output)."""
    job = _sbatch([f"--output={tmp_path}/slurm-%j.out", *args], env)
    state = cluster.wait(job, timeout_s)
    out_file = tmp_path / f"slurm-{job}.out"
    return job, state, out_file.read_text() if out_file.exists() else ""


def _from_here(cluster, url: str) -> str:
    """A URL naming a cluster node, reachable from this process (the host does not resolve the nodes' names)."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    return url.replace(f"//{host}:", f"//{cluster.addrs.get(host, host)}:", 1)


def _queries_served(cluster, url: str) -> int:
    import httpx

    return httpx.get(_from_here(cluster, url) + "/health", timeout=10).json()["queries"]


def _served_lines(out: str, url: str) -> list[int]:
    """The served-query counts of the job's readiness probes of `url`, in order."""
    return [int(n) for n in re.findall(rf"^retrieval service up at {re.escape(url)}: \d+ passages, (\d+) queries served",
                                       out, flags=re.M)]


def _searches(run: Path) -> int:
    """Searches that reached the retriever in a run: env/number_of_valid_search is a mean per rollout."""
    cfg = json.loads((run / "config.json").read_text())
    rollouts = cfg["trainer"]["questions_per_step"] * cfg["rollout"]["group_size"]
    return round(sum(r["env/number_of_valid_search"] * rollouts for r in _rows(run)))


def _state_dict(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def _moved(trained: dict, start: dict) -> bool:
    """Same tensors as the start weights, some of them changed (a step ran, these are not the start weights)."""
    import torch

    return trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.fixture(scope="module")
def retrieval_job(slurm_cluster, tiny_world, tmp_path_factory):
    """`INDEX_DIR=<bm25 index> sbatch slurm/retrieval_server.sh`, running until the module's tests are done; the URL
    it wrote to logs/<job>/retrieval_url. Its port is free on this machine (8000, the default, is the two-node
    jobs' retrieval component's on its node)."""
    tmp = tmp_path_factory.mktemp("retrieval_job")
    port = free_port(taken={8000, *slurm_cluster.ports})
    env = _job_env(tmp, INDEX_DIR=str(tiny_world[1]), RETRIEVAL_PORT=str(port))
    job = _sbatch([f"--output={tmp}/slurm-%j.out", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=100M",
                   "slurm/retrieval_server.sh"], env)
    url_file, t0 = tmp / "logs" / f"sdsearch-retrieval-{job}" / "retrieval_url", time.time()
    while not (url_file.exists() and url_file.read_text().endswith("\n")):
        out = (tmp / f"slurm-{job}.out").read_text() if (tmp / f"slurm-{job}.out").exists() else ""
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} ended:\n{out}"
        assert time.time() - t0 < 120, f"no retrieval_url after 120 s:\n{out}"
        time.sleep(0.5)
    yield {"job": job, "url": url_file.read_text().strip(), "port": port, "out": tmp / f"slurm-{job}.out"}
    sh(f"scancel {job}", check=False)


def test_retrieval_server_sh_serves_its_index_at_the_url_it_writes(slurm_cluster, retrieval_job, tiny_world):
    """The service job stays up on a node of the cluster at the URL it printed and wrote; from another machine (this
    one) it answers queries with exactly what its index answers in-process, evidence passages included."""
    from urllib.parse import urlsplit

    from nemo_sdsearch.retrieval.client import RetrievalClient
    from nemo_sdsearch.retrieval.index import IndexRetriever

    world, index = tiny_world
    url = retrieval_job["url"]
    assert urlsplit(url).hostname in slurm_cluster.nodes and urlsplit(url).port == retrieval_job["port"], url
    passages = sum(1 for _ in (world / "train_corpus.jsonl").open())
    out = retrieval_job["out"].read_text()
    assert f"retrieval service up at {url}: {passages} passages, 0 queries served\n{url}\n" in out, out
    assert slurm_cluster.job_state(retrieval_job["job"]) == "RUNNING"

    questions = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:6]]
    hops = [h for q in questions for h in q["metadata"]["hops"]]
    queries = [h["query"] for h in hops]
    client = RetrievalClient(_from_here(slurm_cluster, url))
    try:
        served = client.search(queries, topk=3)
    finally:
        client.close()
    expected = IndexRetriever(index).search(queries, topk=3)
    assert [[d.id for d in docs] for docs in served] == [[d.id for d in docs] for docs in expected]
    assert [[d.contents for d in docs] for docs in served] == [[d.contents for d in docs] for docs in expected]
    assert sum(h["evidence_id"] in {d.id for d in docs} for h, docs in zip(hops, served)) >= len(hops) // 2


@pytest.fixture(scope="module")
def recipe_3b(slurm_cluster, retrieval_job, tiny_world, tmp_path_factory):
    """`MODEL_DIR=<embedded tiny model> RETRIEVAL_URL=<retrieval_job> sbatch slurm/train_3b.sh <recipe on CPU>`, one
    step: {"job", "state", "out", "log", "run", "served"} (served: the queries the service answered meanwhile)."""
    if slurm_cluster.two_nodes_unavailable:  # the het job's components need a node each
        pytest.skip(f"no multi-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    tmp = tmp_path_factory.mktemp("train_3b")
    url = retrieval_job["url"]
    before = _queries_served(slurm_cluster, url)
    env = _job_env(tmp, MODEL_DIR=str(_model_dir()), GPUS_PER_NODE="1", RETRIEVAL_URL=url)
    job, state, out = _run_job(slurm_cluster, tmp, [*ON_CPU, *HET_ON_CPU, "slurm/train_3b.sh",
                                                    *_recipe_on_cpu(tiny_world[0])], env, 600)
    logs = list((tmp / "logs").glob("*/train.log"))
    return {"job": job, "state": state, "out": out, "log": logs[0].read_text() if logs else "", "run": tmp / "run",
            "served": _queries_served(slurm_cluster, url) - before}


def _completed_3b(recipe_3b) -> Path:
    assert recipe_3b["state"] == "COMPLETED", f"slurm/train_3b.sh ended {recipe_3b['state']} (its own test says why)"
    return recipe_3b["run"]


@pytest.mark.timeout(600)
def test_train_3b_sh_runs_its_recipe_against_a_running_retrieval_service(slurm_cluster, recipe_3b, retrieval_job):
    """train_3b.sh with RETRIEVAL_URL: the probe finds the service, the config probe loads the recipe with the job's
    layout (generator torch: no Ray cluster), torchrun runs the recipe's Megatron actor for one step, and every search
    of its rollouts is a query the service answered; the run holds the recipe's settings, a Megatron training
    checkpoint and a final HF model that transformers loads."""
    out, log, run = recipe_3b["out"], recipe_3b["log"], recipe_3b["run"]
    detail = f"{out}\n--- train.log\n{log[-4000:]}\n{slurm_cluster.daemon_logs(10)}"
    assert recipe_3b["state"] == "COMPLETED", detail
    url = retrieval_job["url"]
    assert "end-of-allocation signal lead: 600 s" in out, detail        # from the script's own #SBATCH --signal
    assert "generator: torch\n" in out and f"finished: {run}" in out, detail
    rank = re.search(r"^rank 0 of 1 on (\S+)", log, flags=re.M)
    assert rank and rank.group(1) in slurm_cluster.nodes, detail
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["algorithm"], cfg["actor"], cfg["generator"]) == ("sd_search", "megatron", "torch")
    assert (cfg["prompt"]["instruction"], cfg["prompt"]["chat_template"], cfg["optim"]["lr"]) == ("search_r1", "auto", 1e-6)
    assert cfg["model"]["path"] == str(_model_dir())                   # MODEL_DIR, read by the recipe
    assert (cfg["cluster"]["nodes"], cfg["cluster"]["gpus_per_node"]) == (1, 1)
    assert (cfg["rollout"]["retriever"], cfg["cluster"]["retrieval_url"]) == ("http", url)
    assert [r["step"] for r in _rows(run)] == [1]
    searches = _searches(run)
    assert searches > 0 and recipe_3b["served"] == searches, (searches, recipe_3b["served"])
    assert _served_lines(out, url)[-1] - _served_lines(out, url)[0] == searches, detail
    ckpt = run / "checkpoints" / "megatron_step_000001"
    assert (ckpt / "metadata.json").is_file() and (run / "checkpoints" / "latest").read_text().strip(), list(ckpt.iterdir())
    assert _moved(_state_dict(run / "final"), _state_dict(_model_dir()))


@pytest.mark.timeout(300)
def test_convert_to_hf_sh_writes_the_runs_trained_weights_as_an_hf_model(slurm_cluster, recipe_3b, tmp_path):
    """convert_to_hf.sh on the run's Megatron training checkpoint writes an HF directory that transformers loads,
    holding exactly the weights of the run's final/ (the same step), not the start weights; wrong arguments stop
    it with its usage line."""
    run = _completed_3b(recipe_3b)
    ckpt, hf = run / "checkpoints" / "megatron_step_000001", tmp_path / "hf"
    job, state, out = _run_job(slurm_cluster, tmp_path, ["--cpus-per-task=1", "--mem=100M", "slurm/convert_to_hf.sh",
                                                         str(ckpt), str(hf)], _job_env(tmp_path))
    log = next((tmp_path / "logs").glob("*/convert.log"), None)
    assert state == "COMPLETED" and f"wrote {hf}\n" in out, out + (log.read_text()[-3000:] if log else "")
    import torch

    converted, final = _state_dict(hf), _state_dict(run / "final")
    assert converted.keys() == final.keys() and all(torch.equal(converted[k], final[k]) for k in final)
    assert _moved(converted, _state_dict(_model_dir()))

    job, state, out = _run_job(slurm_cluster, tmp_path, ["--cpus-per-task=1", "--mem=100M", "slurm/convert_to_hf.sh",
                                                         str(ckpt)], _job_env(tmp_path))
    assert state == "FAILED" and "usage: sbatch slurm/convert_to_hf.sh SRC OUT_DIR" in out, out
    assert "ExitCode=2:0" in sh(f"scontrol show job {job}").stdout


@pytest.mark.timeout(300)
def test_eval_sh_evaluates_the_run_through_the_service_under_the_runs_settings(slurm_cluster, recipe_3b,
                                                                               retrieval_job, tiny_world, tmp_path):
    """eval.sh with RUN: `sdsearch eval --run` through the retrieval service. Every setting comes from the run
    except the one given (MAX_TURNS), as results.json records; every search of the evaluation is a query the
    service answered, with the passages it returns for that query; the job prints results.md."""
    run = _completed_3b(recipe_3b)
    url = retrieval_job["url"]
    before = _queries_served(slurm_cluster, url)
    env = _job_env(tmp_path, RUN=str(run), RETRIEVAL_URL=url, MAX_TURNS="3", EVAL_ARGS="--limit 3 --threads 1")
    job, state, out = _run_job(slurm_cluster, tmp_path, ["--gpus-per-node=0", "--cpus-per-task=1", "slurm/eval.sh",
                                                         str(tiny_world[0] / "dev.jsonl")], env)
    results = tmp_path / "logs" / f"sdsearch-eval-{job}" / "eval"
    log = results.parent / "eval.log"
    assert state == "COMPLETED", out + (log.read_text()[-3000:] if log.exists() else "")
    assert (results / "results.md").read_text().strip() in out
    r = json.loads((results / "results.json").read_text())
    s, cfg = r["settings"], json.loads((run / "config.json").read_text())
    for key in ("max_new_tokens", "max_context", "topk"):
        assert s[key] == {"value": cfg["rollout"][key], "from": f"run rollout.{key}"}, key
    for key in ("instruction", "chat_template"):
        assert s[key] == {"value": cfg["prompt"][key], "from": f"run prompt.{key}"}, key
    assert s["max_turns"] == {"value": 3, "from": "--max-turns"}
    assert s["model"] == {"value": str(run / "final"), "from": "run final/"}
    assert s["retrieval_url"] == {"value": url, "from": "--retrieval-url"}
    preds = r["predictions"]["dev"]
    assert len(preds) == 3 and r["scores"]["dev"]["all"]["n"] == 3
    queries = [q for p in preds for q in p["queries"]]
    assert queries and _queries_served(slurm_cluster, url) - before == len(queries)
    from nemo_sdsearch.retrieval.client import RetrievalClient

    client = RetrievalClient(_from_here(slurm_cluster, url))
    try:
        answers = client.search(queries, topk=3)
    finally:
        client.close()
    assert [[d.id for d in docs] for docs in answers] == [ids for p in preds for ids in p["retrieved_ids"]]


@pytest.mark.timeout(300)
def test_eval_sh_without_a_run_takes_the_recipes_prompt_and_refuses_bad_input(slurm_cluster, recipe_3b,
                                                                               retrieval_job, tiny_world, tmp_path):
    """eval.sh with MODEL and no RUN: the Qwen2.5 recipes' prompt (Search-R1's instruction, the chat template) and
    the budgets given; neither RUN nor MODEL, or a RUN that is no run directory: the job fails, saying so."""
    run = _completed_3b(recipe_3b)
    url = retrieval_job["url"]
    env = _job_env(tmp_path, MODEL=str(run / "final"), RETRIEVAL_URL=url, MAX_NEW_TOKENS="40", MAX_CONTEXT="512",
                   MAX_TURNS="1", EVAL_ARGS="--limit 1 --threads 1")
    job, state, out = _run_job(slurm_cluster, tmp_path, ["--gpus-per-node=0", "--cpus-per-task=1", "slurm/eval.sh",
                                                         str(tiny_world[0] / "dev.jsonl")], env)
    results = tmp_path / "logs" / f"sdsearch-eval-{job}" / "eval"
    assert state == "COMPLETED", out
    s = json.loads((results / "results.json").read_text())["settings"]
    assert s["instruction"] == {"value": "search_r1", "from": "--instruction"}
    assert s["chat_template"] == {"value": "auto", "from": "--chat-template"}
    assert s["model"] == {"value": str(run / "final"), "from": "--model"}
    assert (s["max_new_tokens"], s["max_context"], s["max_turns"]) == (
        {"value": 40, "from": "--max-new-tokens"}, {"value": 512, "from": "--max-context"},
        {"value": 1, "from": "--max-turns"})
    assert s["topk"] == {"value": 3, "from": "default"}

    for extra, message, code in (({}, "set RUN to the trained run directory", 1),
                                 ({"RUN": str(tmp_path / "nope")}, "is not a training run directory", 2)):
        job, state, out = _run_job(slurm_cluster, tmp_path, ["--gpus-per-node=0", "--cpus-per-task=1",
                                                             "slurm/eval.sh", "nq.jsonl"],
                                   _job_env(tmp_path, RETRIEVAL_URL=url, **extra))
        assert state == "FAILED" and message in out, out
        assert f"ExitCode={code}:0" in sh(f"scontrol show job {job}").stdout


@pytest.mark.timeout(600)
def test_train_7b_sh_runs_its_recipe_on_two_nodes_with_its_retrieval_component(slurm_cluster, tiny_world, tmp_path):
    """train_7b.sh with INDEX_DIR: the heterogeneous job's second component serves the index on the third node,
    torchrun runs the recipe's Megatron actor as two data-parallel ranks on the two training nodes (gloo over the
    bridge), and every search of the rollouts is a query that component answered; the run holds a Megatron training
    checkpoint and a final HF model that transformers loads."""
    if slurm_cluster.two_nodes_unavailable:
        pytest.skip(f"no two-node cluster here: {slurm_cluster.two_nodes_unavailable}")
    env = _job_env(tmp_path, MODEL_DIR=str(_model_dir()), GPUS_PER_NODE="1", INDEX_DIR=str(tiny_world[1]))
    job, state, out = _run_job(slurm_cluster, tmp_path, [*ON_CPU, *HET_ON_CPU, "slurm/train_7b.sh",
                                                         *_recipe_on_cpu(tiny_world[0])], env, 600)
    logs = list((tmp_path / "logs").glob("*/train.log"))
    log, run = (logs[0].read_text() if logs else ""), tmp_path / "run"
    detail = f"{out}\n--- train.log\n{log[-4000:]}\n{slurm_cluster.daemon_logs(10)}"
    assert state == "COMPLETED", detail
    train_nodes, url = slurm_cluster.nodes[:2], f"http://{slurm_cluster.nodes[2]}:8000"
    assert "end-of-allocation signal lead: 1200 s" in out and "generator: torch\n" in out, detail
    assert f"rendezvous: {train_nodes[0]}:" in out and ", 2 node(s)" in out, detail
    assert {f"rank 0 of 2 on {train_nodes[0]}", f"rank 1 of 2 on {train_nodes[1]}"} <= {
        " ".join(line.split()[:6]) for line in log.splitlines() if line.startswith("rank ")}, detail
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["algorithm"], cfg["actor"], cfg["cluster"]["nodes"], cfg["cluster"]["gpus_per_node"]) == (
        "sd_search", "megatron", 2, 1)
    assert (cfg["rollout"]["retriever"], cfg["cluster"]["retrieval_url"]) == ("http", url)
    assert [r["step"] for r in _rows(run)] == [1]
    searches, served = _searches(run), _served_lines(out, url)
    assert searches > 0 and served[0] == 0 and served[-1] == searches, (searches, served, detail)
    assert (run / "checkpoints" / "megatron_step_000001" / "metadata.json").is_file()
    assert _moved(_state_dict(run / "final"), _state_dict(_model_dir()))


def test_the_cluster_bridge_takes_a_subnet_nothing_on_the_machine_uses():
    """free_subnet skips a /24 that an interface of the machine holds (a bridge made here), and takes it again once
    the link is gone."""
    from slurm_cluster import free_subnet

    if os.geteuid() != 0 or missing(["ip"]):
        pytest.skip("needs root and ip to add a link")
    first = free_subnet()
    assert first is not None
    link = "sdstest0"
    sh(f"ip link del {link}", check=False)
    sh(f"ip link add {link} type bridge && ip addr add {first}.7/24 dev {link}")
    try:
        second = free_subnet()
        assert second is not None and second != first
    finally:
        sh(f"ip link del {link}", check=False)
    assert free_subnet() == first
