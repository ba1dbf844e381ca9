"""A real SLURM cluster on this machine for tests/test_slurm.py: munge, slurmctld and one slurmd per node.

Namespaced nodes where the machine allows it (root, network namespaces, veth pairs, a bridge): `sdnode1` and
`sdnode2` (the training nodes of a two-node job) and `sdnode3` (a heterogeneous job's retrieval component:
SLURM's backfill scheduler, the only one that starts heterogeneous jobs, does not place two components on
one node) are each a Linux network namespace of that name with

- an address on a private bridge the fixture creates (`sdsbr0`, a /24 that no address or route of the machine
  overlaps, chosen at setup: 192.168.213.0/24 when it is free; the host end is .1, the nodes .11 to .13; no
  route leads from the namespaces to anything outside this machine),
- its own hostname (a UTS namespace: `nsenter --net` into the namespace, then `unshare --uts --mount`),
- its own /etc/hosts naming the cluster and an empty resolv.conf (bind mounts in that private mount
  namespace, so the host's files are never touched),
- its own slurmd (`slurmd -N <node>`), from which the job steps on that node inherit all of this.

slurmctld and munged run in the host's namespaces; the nodes reach slurmctld at the bridge's address.
Debian's slurm-wlm is built with multiple-slurmd support, but slurmds sharing one network stack would
share one hostname and one address: the namespaces are what make two ranks on two "nodes" talk over a
network. Where namespaces cannot be made (or the host's firewall drops bridged traffic), one node on
localhost: the one-node tests still run and the two-node test skips with the reason
(`Cluster.two_nodes_unavailable`).

Everything lives in BASE (slurm.conf, state, spool, logs, pid files, a private munge key and socket):
nothing under /etc is written, clients find the cluster through SLURM_CONF, and slurmctld's and slurmd's
ports are chosen free on this machine at setup (the kernel picks them, not SLURM's defaults), so a SLURM
already installed on the machine is left alone.

Nothing is installed here: `scripts/install_test_cluster.sh` installs slurm-wlm, munge, iproute2, util-linux
and shellcheck (as root, with apt-get) before the tests run; without them the tests that need a cluster skip
and name that script. Teardown (also run before setup, for
what a killed run left): cancel the jobs, stop slurmd, kill whatever still runs in the node namespaces,
stop slurmctld and munged (by their pid files), delete the namespaces and the bridge, and remove BASE but
the daemons' logs (kept for a post-mortem).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = Path("/tmp/sdsearch-slurm")
LOCK = Path("/tmp/sdsearch-slurm.lock")   # one cluster at a time on a machine (concurrent test runs wait)
BRIDGE = "sdsbr0"
NODES = ("sdnode1", "sdnode2", "sdnode3")
INSTALL = "scripts/install_test_cluster.sh"   # what installs the binaries below (the tests never install)
SLURM_BINARIES = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "slurmctld", "slurmd", "munged")
NETWORK_BINARIES = ("ip", "unshare", "nsenter")

SLURM_CONF = """\
ClusterName=sdsearch-test
SlurmctldHost={ctl_host}({ctl_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s; a node refuses to
# launch a job whose credential it revoked until then): 10 s keeps the requeue tests short, and honest
AuthInfo=socket={base}/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# heterogeneous jobs are started by the backfill scheduler only: run it every second, not every 30
SchedulerParameters=bf_interval=1
# the nodes share this machine's cores: trust the CPU counts below, do not drain a node for them
SlurmdParameters=config_overrides
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/ctld
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=3600
KillWait=5
{nodes}
PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(Exception):
    """SLURM cannot run here at all (the reason is the message): the tests that need it skip."""


def sh(cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{cmd}` exited {p.returncode}: {(p.stdout + p.stderr).strip()[-1500:]}")
    return p


def missing(binaries) -> str | None:
    """Why the tests cannot use `binaries` (some are not on PATH: install them with INSTALL), or None."""
    absent = [b for b in binaries if not shutil.which(b)]
    if not absent:
        return None
    return f"{', '.join(absent)} not installed: run `{INSTALL}` (as root) before the tests"


def free_port(taken=()) -> int:
    """A TCP port nothing on this machine listens on now (the kernel's pick), not one of `taken`."""
    while True:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def free_subnet() -> str | None:
    """The first /24 (as "a.b.c") of 192.168.213, then 192.168.200-254, then 10.213.0-255 that no IPv4 address or
    route of this machine overlaps (a Docker network, a VPN, another test's bridge); None if all are taken."""
    used = []
    for cmd in ("ip -4 -o addr show", "ip -4 route show table all"):
        for tok in sh(cmd, check=False, timeout=30).stdout.split():
            with contextlib.suppress(ValueError):
                if tok[0].isdigit():
                    used.append(ipaddress.ip_network(tok, strict=False))
    candidates = ["192.168.213"] + [f"192.168.{c}" for c in range(200, 255)] + [f"10.213.{c}" for c in range(256)]
    for sub in candidates:
        net = ipaddress.ip_network(f"{sub}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return sub
    return None


@dataclass
class Cluster:
    nodes: list[str]                   # node names, as in the job's SLURM_JOB_NODELIST
    two_nodes_unavailable: str | None  # why there is only one node (None: two namespaced nodes)
    conf: Path
    addrs: dict = field(default_factory=dict)   # node name -> its IPv4 address (reachable from this machine)
    ports: tuple = (0, 0)              # (slurmctld, slurmd) ports chosen at setup

    def job_state(self, job: str) -> str:
        out = sh(f"scontrol show job {job}", check=False).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, timeout_s: int) -> str:
        """The job's state once it is no longer pending, running or requeued (or after timeout_s)."""
        t0 = time.time()
        state = self.job_state(job)
        while state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") and time.time() - t0 < timeout_s:
            time.sleep(2)
            state = self.job_state(job)
        return state

    def daemon_logs(self, lines: int = 30) -> str:
        return "".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) + "\n"
                       for p in sorted(BASE.glob("*.log")))


# --------------------------------------------------------------------------------------------------
# processes: only those this fixture started, found through its pid files and its namespaces
# --------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _status(pid)


def _status(pid: int) -> str:
    try:
        return next((l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("State:")), "")
    except OSError:
        return ""


def _kill(pids: list[int], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL what is still alive after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _pid_from(pidfile: Path, comm: str) -> int | None:
    """The pid in `pidfile` if that process is still a `comm` (a recycled pid is left alone)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == comm else None
    except (OSError, ValueError, IndexError):
        return None


def _netns_pids(ns: str) -> list[int]:
    p = sh(f"ip netns pids {ns}", check=False, timeout=30)
    return [int(x) for x in p.stdout.split() if x.isdigit()] if p.returncode == 0 else []


def teardown() -> None:
    """Stop everything a previous or the current run of this fixture started; safe to call any time."""
    conf = BASE / "slurm.conf"
    if conf.exists() and _pid_from(BASE / "slurmctld.pid", "slurmctld"):
        env = f"SLURM_CONF={conf}"
        sh(f"{env} scancel --user=root", check=False, timeout=30)
        for _ in range(30):  # the steps end (KillWait=5 s between SIGTERM and SIGKILL)
            if not sh(f"{env} squeue -h -o %i", check=False, timeout=30).stdout.strip():
                break
            time.sleep(1)
    netns = sh("ip netns list", check=False, timeout=30).stdout if shutil.which("ip") else ""
    ours = [ns for ns in NODES if any(line.split()[:1] == [ns] for line in netns.splitlines())]
    daemons = [_pid_from(pf, "slurmd") for pf in BASE.glob("slurmd-*.pid")]
    _kill([p for p in daemons if p])
    for ns in ours:  # job processes a cancelled step left behind in the node
        _kill(_netns_pids(ns), grace_s=5)
    for pidfile, comm in ((BASE / "slurmctld.pid", "slurmctld"), (BASE / "munged.pid", "munged")):
        pid = _pid_from(pidfile, comm)
        if pid:
            _kill([pid])
    _teardown_network()
    if BASE.exists():  # the daemons' logs stay for a post-mortem; state, spool, the munge key go
        for path in BASE.iterdir():
            if path.suffix != ".log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _teardown_network() -> None:
    if not shutil.which("ip"):
        return
    netns = sh("ip netns list", check=False, timeout=30).stdout
    for ns in NODES:
        if any(line.split()[:1] == [ns] for line in netns.splitlines()):
            sh(f"ip netns del {ns}", check=False, timeout=30)
    if sh(f"ip link show {BRIDGE}", check=False, timeout=30).returncode == 0:
        sh(f"ip link del {BRIDGE}", check=False, timeout=30)


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------
def _network(subnet: str) -> str | None:
    """The bridge and the node namespaces on `subnet` (a free /24, "a.b.c"); the reason they cannot be made (or
    cannot talk), or None."""
    reason = missing(NETWORK_BINARIES)
    if reason:
        return reason
    steps = [f"ip link add {BRIDGE} type bridge", f"ip addr add {subnet}.1/24 dev {BRIDGE}",
             f"ip link set {BRIDGE} up"]
    for i, ns in enumerate(NODES, start=1):
        steps += [f"ip netns add {ns}",
                  f"ip link add sdsveth{i} type veth peer name eth0 netns {ns}",
                  f"ip link set sdsveth{i} master {BRIDGE} up",
                  f"ip -n {ns} addr add {subnet}.{10 + i}/24 dev eth0",
                  f"ip -n {ns} link set eth0 up", f"ip -n {ns} link set lo up"]
    for step in steps:
        p = sh(step, check=False, timeout=30)
        if p.returncode != 0:
            return f"cannot build the two-node network (`{step}`: {p.stderr.strip()[:200]})"
    # TCP between two nodes crosses the bridge (a host whose firewall filters bridged traffic, e.g. Docker's
    # FORWARD policy with br_netfilter, would drop it): a listener in the first node, a connection from the second
    listen = ("import socket; s = socket.create_server(('0.0.0.0', 6999)); s.settimeout(10); "
              "c, _ = s.accept(); c.sendall(b'ok'); c.close()")
    connect = (f"import socket; c = socket.create_connection(('{subnet}.11', 6999), timeout=2); "
               "print(c.recv(2).decode())")
    server = subprocess.Popen(["ip", "netns", "exec", NODES[0], sys.executable, "-c", listen],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(20):  # until the listener is up
            p = subprocess.run(["ip", "netns", "exec", NODES[1], sys.executable, "-c", connect],
                               capture_output=True, text=True, timeout=30, check=False)
            if p.stdout.strip() == "ok":
                return None
            time.sleep(0.5)
        return f"TCP from {NODES[1]} to {NODES[0]} over the bridge {BRIDGE} is blocked: {p.stderr.strip()[-200:]}"
    finally:
        server.kill()
        server.wait()


def _start_munge() -> None:
    key = BASE / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sh(f"munged --socket={BASE}/munge.socket --key-file={key} --pid-file={BASE}/munged.pid "
       f"--log-file={BASE}/munged.log --seed-file={BASE}/munged.seed")


def _start(conf: Path, two_nodes: bool, host: str, subnet: str) -> None:
    sh(f"slurmctld -f {conf} -c")  # -c: no state from an earlier run
    if not two_nodes:
        (BASE / f"spool-{host}").mkdir(exist_ok=True)
        sh(f"slurmd -f {conf} -N {host}")
        return
    for i, ns in enumerate(NODES, start=1):
        etc = BASE / f"etc-{ns}"
        etc.mkdir(exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{subnet}.1 {host}\n"
                                   + "".join(f"{subnet}.{10 + j} {n}\n" for j, n in enumerate(NODES, start=1)))
        (etc / "resolv.conf").write_text("# no name server: the cluster's names are in /etc/hosts\n")
        (BASE / f"spool-{ns}").mkdir(exist_ok=True)
        inner = (f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf && "
                 f"hostname {ns} && exec slurmd -f {conf} -N {ns}")
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup tree slurmd needs
        sh(f"nsenter --net=/run/netns/{ns} unshare --uts --mount -- sh -c '{inner}'")


def _wait_idle(nodes: list[str], timeout_s: int = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        p = sh("sinfo -h -N -o '%N %T'", check=False, timeout=30)
        states = dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)
        if p.returncode == 0 and all(states.get(n) in ("idle", "mixed") for n in nodes):
            return
        for n, s in states.items():
            if s.startswith(("down", "drain")):
                sh(f"scontrol update nodename={n} state=resume", check=False, timeout=30)
        time.sleep(1)
    raise RuntimeError("SLURM did not come up: " + sh("sinfo -N -l", check=False).stdout
                       + Cluster([], None, BASE / "slurm.conf").daemon_logs())


@contextlib.contextmanager
def running_cluster():
    """A two-node (or, where namespaces are missing, one-node) SLURM cluster for the duration of the block;
    SLURM_CONF in os.environ points at it meanwhile. Raises ClusterUnavailable when SLURM cannot run."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("needs root to start SLURM daemons and network namespaces")
    reason = missing(SLURM_BINARIES)
    if reason:
        raise ClusterUnavailable(reason)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = os.environ.get("SLURM_CONF")
        teardown()
        try:
            shutil.rmtree(BASE, ignore_errors=True)
            BASE.mkdir(mode=0o711)  # munged wants its socket's folder executable by all, writable by root only
            BASE.chmod(0o711)
            _start_munge()
            host = socket.gethostname().split(".")[0]
            subnet = free_subnet()
            reason = _network(subnet) if subnet else "every candidate /24 for the bridge is in use on this machine"
            if reason:
                _teardown_network()  # whatever part of it was made
                nodes, addrs, ctl_addr = [host], ["127.0.0.1"], "127.0.0.1"
            else:
                nodes, addrs, ctl_addr = list(NODES), [f"{subnet}.{10 + i}" for i in range(1, len(NODES) + 1)], f"{subnet}.1"
            cpus = max(2, os.cpu_count() or 1)
            conf = BASE / "slurm.conf"
            # ports free now (the daemons bind them within a second; slurmd's is free in a fresh namespace anyway)
            ctld_port = free_port()
            slurmd_port = free_port(taken={ctld_port})
            conf.write_text(SLURM_CONF.format(
                ctl_host=host, ctl_addr=ctl_addr, ctld_port=ctld_port, slurmd_port=slurmd_port, base=BASE,
                nodelist=",".join(nodes),
                nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory=1024 State=UNKNOWN"
                                for n, a in zip(nodes, addrs))))
            os.environ["SLURM_CONF"] = str(conf)
            _start(conf, reason is None, host, subnet)
            _wait_idle(nodes)
            yield Cluster(nodes, reason, conf, dict(zip(nodes, addrs)), (ctld_port, slurmd_port))
        finally:
            teardown()
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
