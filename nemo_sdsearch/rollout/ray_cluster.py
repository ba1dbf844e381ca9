"""The job's Ray cluster, which holds the TensorRT-LLM engines: started on every node of a SLURM job the way
NeMo-RL's `ray.sub` does it, and reached by the trainer's ranks as Ray drivers.

`slurm/common.sh` (`sdsearch_ray_cluster`) runs, inside the job's container on each node:

    python -m nemo_sdsearch.rollout.ray_cluster node-ip            # on the first node: the head's IP address
    python -m nemo_sdsearch.rollout.ray_cluster start --head-ip IP  # one long-lived step, one task per node
    python -m nemo_sdsearch.rollout.ray_cluster wait --address IP:PORT --nodes N

Why each piece is the way it is:
- **IP addresses, never host names.** Ray keeps `--node-ip-address` as given and names a node's resource
  `node:<that string>`; the engines' placement bundles are pinned with `node:<ip>` (trtllm_placement.py). A
  head registered under a host name leaves those bundles infeasible. `node_ip` is the one rule for "this
  node's address" (ray start, the trainer's device slots and its Ray driver all use it): `SDSEARCH_NODE_IP`
  if set, else the first non-loopback address the host name resolves to, else the source address of the
  route towards the head (or, as Ray itself does, towards a public address), else 127.0.0.1 (a machine
  without a network: a one-node cluster).
- **The launcher's variables stay out of Ray.** `start` removes the SLURM / PMI / PMIx / Open MPI / torchrun
  variables (`is_launcher_variable`, the one rule; the engine build hides the same ones on the driver side)
  before `ray start`: the raylet's environment is what every Ray worker, and so every TensorRT-LLM worker,
  inherits.
- **One long-lived step, the driver in the same container.** `ray start --block` keeps each node's task in
  the foreground until the job ends (or `sdsearch_ray_stop` stops it); the training step then runs on the
  same nodes with `--overlap` and, under pyxis, `--container-name` (the same named container), so a rank's
  Ray driver shares the raylet's session directory and /dev/shm (CUDA IPC for the refit).
- **One authentication rule for every process of the cluster.** Ray 2.53+ turns token authentication on for a
  node that finds a token in ~/.ray/auth_token while a driver connecting to a remote head does not, so a
  stray token file splits a cluster into nodes and drivers that cannot talk. `auth_environment` makes the
  choice explicit: with `RAY_AUTH_TOKEN` set (slurm/common.sh generates one per job) every node, driver and
  Ray worker runs `RAY_AUTH_MODE=token` with it; without one, `RAY_AUTH_MODE=disabled` everywhere (older Ray
  ignores both).
- **Workers wait for the head** (a TCP connect to its GCS port) before `ray start --address`, and `wait`
  returns once N nodes are alive, so the trainer never races a half-started cluster.
- `SDSEARCH_RAY_TMPDIR`: Ray's temporary root for this node (a per-node folder `<root>/<host name>` is made):
  needed only where several "nodes" share one /tmp (the test cluster's network namespaces); unset, Ray's
  default. Keep it short: Ray's socket paths under it must fit AF_UNIX's 107 bytes (checked here). `SDSEARCH_RAY_START_ARGS`: extra `ray start` flags (e.g. `--object-store-memory=...`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

DEFAULT_PORT = 6379
# Variables of the launcher (SLURM, PMI/PMIx, Open MPI, torchrun) that must reach neither a Ray node nor a
# TensorRT-LLM worker (trtllm_placement.engine_environment hides them while an engine starts).
LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_FD", "PMI_SIZE",
                  "PMI_RANK")


def is_launcher_variable(name: str) -> bool:
    return name in LAUNCHER_NAMES or name.startswith(LAUNCHER_PREFIXES)


def _usable(ip: str) -> bool:
    return bool(ip) and not ip.startswith("127.") and ip != "0.0.0.0"


def node_ip(route_to: str | None = None) -> str:
    """This node's IP address as the job's Ray cluster names it (see the module docstring for the rule).
    `route_to`: a host (the head) whose route picks the interface when the host name does not resolve to a
    usable address."""
    given = os.environ.get("SDSEARCH_NODE_IP")
    if given:
        return given
    try:
        addresses = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        addresses = []
    for ip in addresses:
        if _usable(ip):
            return ip
    target = route_to or (os.environ.get("RAY_ADDRESS", "").rsplit(":", 1)[0] or os.environ.get("MASTER_ADDR"))
    for host in (target, "8.8.8.8"):
        if not host:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))  # no packet is sent: the kernel picks the source address of the route
                ip = s.getsockname()[0]
        except OSError:
            continue
        if _usable(ip) or host == target:
            return ip  # a loopback head (a one-machine cluster) is reached through loopback
    return "127.0.0.1"


def auth_environment(env: dict | None = None) -> dict:
    """`env` (default os.environ, changed in place) with the cluster's one authentication rule (module
    docstring): RAY_AUTH_MODE=token when RAY_AUTH_TOKEN is set, else disabled; an explicit mode is kept."""
    env = os.environ if env is None else env
    if "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token" if env.get("RAY_AUTH_TOKEN") else "disabled"
    if env["RAY_AUTH_MODE"] == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        raise RuntimeError("RAY_AUTH_MODE=token needs the cluster's token in RAY_AUTH_TOKEN (slurm/common.sh makes one "
                           "per job) or RAY_AUTH_TOKEN_PATH")
    if env is os.environ and "ray" in sys.modules:
        # Ray reads the mode into its config when imported: refresh it, as Ray itself does when it turns token
        # authentication on (ray._private.authentication.authentication_token_setup)
        try:
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):  # a Ray without token authentication
            pass
    return env


def scrubbed_environment() -> dict[str, str]:
    """os.environ without the launcher's variables (SLURM, PMI/PMIx, Open MPI, torchrun), with the cluster's
    authentication rule: what `ray start` gets."""
    env = {k: v for k, v in os.environ.items() if not is_launcher_variable(k)}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return auth_environment(env)


def ray_executable() -> str:
    """The `ray` script of this interpreter's environment (the Ray this process imports, also when the venv is
    not activated: `/venv/bin/python -m ...` leaves it off PATH), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.access(here, os.X_OK) else (shutil.which("ray") or "ray")


def start_command(head_ip: str, port: int, gpus: int, cpus: int | None, me: str) -> list[str]:
    """The `ray start ... --block` of this node: the head when `me` is the head's address, else a worker."""
    cmd = [ray_executable(), "start", f"--node-ip-address={me}", f"--num-gpus={gpus}", "--disable-usage-stats", "--block"]
    cmd += ["--head", f"--port={port}", "--include-dashboard=false"] if me == head_ip else [f"--address={head_ip}:{port}"]
    if cpus:
        cmd.append(f"--num-cpus={cpus}")
    root = os.environ.get("SDSEARCH_RAY_TMPDIR")
    if root:
        folder = os.path.join(root, socket.gethostname())
        # <folder>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store must fit in a unix socket address
        longest = len(folder) + len("/session_2026-12-07_00-46-55_861325_1234567/sockets/plasma_store")
        if longest > 107:
            raise SystemExit(f"SDSEARCH_RAY_TMPDIR={root}: Ray's socket paths under it would be {longest} bytes, over "
                             "the 107 a unix socket allows; choose a shorter folder (e.g. under /tmp)")
        os.makedirs(folder, exist_ok=True)
        cmd.append(f"--temp-dir={folder}")
    return cmd + shlex.split(os.environ.get("SDSEARCH_RAY_START_ARGS", ""))


def _wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head {host}:{port} did not answer within {timeout_s:.0f} s ({e})") from None
            time.sleep(1)


def start(head_ip: str, port: int = DEFAULT_PORT, gpus: int = 0, cpus: int | None = None,
          timeout_s: float = 600) -> None:
    """Become this node's Ray process (exec: `ray start ... --block` replaces this process)."""
    me = node_ip(route_to=head_ip)
    if me != head_ip:
        _wait_for_port(head_ip, port, timeout_s)
    cmd = start_command(head_ip, port, gpus, cpus, me)
    print(f"ray node {socket.gethostname()} ({me}, {'head' if me == head_ip else 'worker'}): {shlex.join(cmd)}",
          flush=True)
    os.execvpe(cmd[0], cmd, scrubbed_environment())


def wait(address: str, nodes: int, timeout_s: float = 600) -> list[dict]:
    """Block until `nodes` Ray nodes are alive in the cluster at `address`; returns them."""
    import ray

    host, port = address.rsplit(":", 1)
    _wait_for_port(host, int(port), timeout_s)  # (ray.init itself retries a missing head for a long time)
    auth_environment()
    ray.init(address=address, log_to_driver=False, _node_ip_address=node_ip(route_to=host))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= nodes:
                return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of {nodes} Ray nodes joined {address} within {timeout_s:.0f} s")
            time.sleep(1)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def one_node_cluster(gpus: int = 0, cpus: int | None = None, env: dict | None = None, timeout_s: float = 120):
    """A Ray cluster of this machine alone for the block (the `start` / `wait` commands a job script runs, as
    subprocesses): its own token, a short temporary folder, this node's IP, a free port. Yields the environment
    its drivers need (`env` plus RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN, SDSEARCH_RAY_TMPDIR); the head is
    stopped at the end. For one-node runs and checks without SLURM (the GPU kit, the tests)."""
    ip = node_ip()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "SDSEARCH_RAY_TMPDIR": tempfile.mkdtemp(prefix="sdray", dir="/tmp"), "RAY_ADDRESS": f"{ip}:{port}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    me = [sys.executable, "-m", __name__]
    head = subprocess.Popen([*me, "start", "--head-ip", ip, "--port", str(port), "--gpus", str(gpus),
                             *(["--cpus", str(cpus)] if cpus else [])], env=env)
    try:
        p = subprocess.run([*me, "wait", "--address", env["RAY_ADDRESS"], "--nodes", "1", "--timeout", str(timeout_s)],
                           env=env, capture_output=True, text=True, timeout=timeout_s + 60)
        if p.returncode != 0:
            raise RuntimeError(f"the one-node Ray cluster did not come up: {p.stdout[-1000:]}{p.stderr[-2000:]}")
        yield env
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nemo_sdsearch.rollout.ray_cluster", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("node-ip", help="print this node's IP address (the rule of node_ip)")
    s = sub.add_parser("start", help="start this node's Ray process (head or worker) and block")
    s.add_argument("--head-ip", required=True)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--gpus", type=int, default=0, help="GPUs of this node (0: a CPU-only run)")
    s.add_argument("--cpus", type=int, default=None, help="CPUs Ray may schedule on (default: Ray's count)")
    s.add_argument("--timeout", type=float, default=600, help="seconds a worker waits for the head")
    w = sub.add_parser("wait", help="wait until N nodes are alive")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if args.cmd == "node-ip":
        print(node_ip())
    elif args.cmd == "start":
        start(args.head_ip, args.port, args.gpus, args.cpus, args.timeout)
    else:
        alive = wait(args.address, args.nodes, args.timeout)
        print(f"ray: {len(alive)} node(s) up at {args.address}: "
              + ", ".join(sorted(n["NodeManagerAddress"] for n in alive)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
