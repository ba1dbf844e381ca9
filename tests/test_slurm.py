"""The sbatch scripts on a real one-node SLURM cluster on localhost (Debian slurm-wlm + munge), and
shellcheck on every script. Needs root (to write /etc/slurm and start the daemons); skips otherwise."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def _sh(cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=check, timeout=timeout)


def _install(packages: str) -> str | None:
    """Install Debian packages if missing; the reason we cannot, or None."""
    if os.geteuid() != 0:
        return "needs root to install and start SLURM"
    if not shutil.which("apt-get"):
        return "no apt-get (not a Debian-family machine)"
    p = _sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {packages}", check=False, timeout=1200)
    if p.returncode != 0:
        p = _sh(f"apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {packages}",
                check=False, timeout=1800)
    return None if p.returncode == 0 else f"apt-get install {packages} failed: {p.stderr[-300:]}"


def test_shellcheck_every_script():
    if not shutil.which("shellcheck"):
        reason = _install("shellcheck")
        if reason:
            pytest.skip(reason)
    assert SCRIPTS, "no sbatch scripts"
    p = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    names = {s.name for s in SCRIPTS}
    assert {"train_7b.sh", "train_3b.sh", "retrieval_server.sh", "eval.sh", "convert_to_hf.sh",
            "train_tiny.sh"} <= names


SLURM_CONF = """\
ClusterName=sdsearch-test
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    if not shutil.which("sbatch") or not shutil.which("munged"):
        reason = _install("slurm-wlm munge")
        if reason:
            pytest.skip(reason)
    host = _sh("hostname -s").stdout.strip()
    cpus = os.cpu_count() or 1
    mem = int(_sh("free -m | awk '/^Mem:/ {print $2}'").stdout.strip()) * 8 // 10
    conf = Path("/etc/slurm/slurm.conf")
    backup = conf.read_text() if conf.exists() else None
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(SLURM_CONF.format(host=host, cpus=cpus, mem=mem))
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
    if not Path("/etc/munge/munge.key").exists():
        _sh("mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f")
    _sh("chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null; "
        "chmod 400 /etc/munge/munge.key", check=False)
    _sh("pkill -x slurmctld; pkill -x slurmd; sleep 1", check=False)
    _sh("pgrep -x munged || su -s /bin/sh munge -c /usr/sbin/munged || /usr/sbin/munged --force", check=False)
    _sh("slurmctld -c", check=False)  # -c: clear previous state (jobs of an earlier test run)
    _sh("slurmd", check=False)
    for _ in range(60):
        p = _sh("sinfo -h -o '%T'", check=False)
        if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed"):
            break
        _sh(f"scontrol update nodename={host} state=resume", check=False)
        time.sleep(1)
    else:
        pytest.fail("SLURM did not come up: " + _sh("sinfo; tail -20 /var/log/slurmctld.log /var/log/slurmd.log",
                                                     check=False).stdout)
    yield host
    _sh("pkill -x slurmd; pkill -x slurmctld", check=False)
    if backup is not None:
        conf.write_text(backup)


def _job_state(job: str) -> str:
    out = _sh(f"scontrol show job {job}", check=False).stdout
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "UNKNOWN"


def _wait(job: str, timeout_s: int) -> str:
    t0 = time.time()
    state = _job_state(job)
    while state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") and time.time() - t0 < timeout_s:
        time.sleep(3)
        state = _job_state(job)
    return state


TINY = ["trainer.steps=2", "trainer.questions_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16",
        "rollout.max_turns=1", "rollout.max_context=512", "data.dev_questions=2", "data.test_questions=4",
        "trainer.eval_every=0", "trainer.save_every=1", "trainer.final_test_eval=false", "grpo.micro_batch_size=2"]


def test_sbatch_train_tiny_finishes_and_checkpoints(slurm_cluster, tmp_path):
    env = {**os.environ, "SDSEARCH_VENV": sys.prefix, "SDSEARCH_LOGS": str(tmp_path / "logs"),
           "SDSEARCH_OUT": str(tmp_path / "run")}
    p = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/train_tiny.sh", *TINY],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job = p.stdout.strip().split(";")[0]
    state = _wait(job, 900)
    out = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    logs = list((tmp_path / "logs").glob("*/train.log"))
    detail = out + "".join(l.read_text()[-2000:] for l in logs)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{detail}"
    assert logs and logs[0].parent.name == f"sdsearch-tiny-{job}"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists(), detail
    assert list((tmp_path / "run" / "checkpoints").iterdir()), detail


def test_requeued_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    """A job requeued after its first checkpoint (what preemption does) continues from that step."""
    env = {**os.environ, "SDSEARCH_VENV": sys.prefix, "SDSEARCH_LOGS": str(tmp_path / "logs"),
           "SDSEARCH_OUT": str(tmp_path / "run")}
    overrides = [o if not o.startswith("trainer.steps") else "trainer.steps=4" for o in TINY]
    p = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/train_tiny.sh",
                        *overrides], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job = p.stdout.strip().split(";")[0]
    ckpts = tmp_path / "run" / "checkpoints"
    t0 = time.time()
    while not (ckpts.exists() and any(ckpts.iterdir())) and time.time() - t0 < 600:
        assert _job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _job_state(job)
        time.sleep(1)
    _sh(f"scontrol requeue {job}")
    state = _wait(job, 900)
    log = next((tmp_path / "logs").glob("*/train.log")).read_text()
    assert state == "COMPLETED", f"{state}\n{log[-3000:]}"
    assert "resumed from step" in log, log[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


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
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "generator 7b: trtllm" in p.stdout and "generator tiny: torch" in p.stdout
    assert "RAY_ADDRESS=gpu-n1:6379" in p.stdout
    steps = [line for line in calls.read_text().splitlines() if " ray start" in line]
    assert len(steps) == 2, steps
    head, worker = steps
    assert "-w gpu-n1" in head and "--head" in head and "--num-gpus=8" in head and "--block" in head
    assert "-w gpu-n2" in worker and "--address=gpu-n1:6379" in worker and "--num-gpus=8" in worker
