"""The retrieval server's limits under both ends of the uvicorn range that pyproject.toml admits (issue 25).

The server's connection guard (retrieval/server.py, `ConnectionGuard`) uses only uvicorn's public surface, so the
range is wide; the rest of the suite runs the installed uvicorn. Here the oldest and the newest release the range
allows, vendored as their (pure-python) wheels in tests/fixtures/wheels/ so that this runs offline, each serve a
real `python -m nemo_sdsearch.retrieval serve` child with the wheel first on PYTHONPATH, and the child is checked
from outside: a normal /retrieve answer (two on one kept-alive connection), a Content-Length over the cap refused
with 413 before the body is read, a slowloris client cut with 408 at the header deadline, an idle connection
closed without an answer, the connection cap answering 503 at connect, and /health's counters of all that."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from nemo_sdsearch.retrieval.build import build_index
from test_retrieval_hardening import exchange, read_response, status_and_error
from test_retrieval_service import corpus_file, interrupt  # noqa: F401 - corpus_file: a fixture

REPO = Path(__file__).resolve().parents[1]
WHEELS = Path(__file__).resolve().parent / "fixtures" / "wheels"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 50_000
MAX_CONNECTIONS = 6
READ_S = 20.0  # how long a client waits for an answer or for the server to close


def uvicorn_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "uvicorn"]
    return req


def vendored() -> dict[Version, Path]:
    out = {}
    for wheel in WHEELS.glob("uvicorn-*-py3-none-any.whl"):
        out[Version(wheel.name.split("-")[1])] = wheel
    return out


def range_ends() -> tuple[Version, Version]:
    """The oldest and the newest vendored uvicorn the pyproject range admits: they must be its two ends (the
    lower bound itself, and the newest release below the upper bound when the wheels were vendored)."""
    spec = uvicorn_requirement().specifier
    lower = [Version(s.version) for s in spec if s.operator == ">="]
    upper = [Version(s.version) for s in spec if s.operator == "<"]
    assert len(lower) == 1 and len(upper) == 1, f"uvicorn{spec}: expected a `>=low,<high` range"
    inside = sorted(v for v in vendored() if v in spec)
    assert inside and inside[0] == lower[0], (
        f"the oldest uvicorn uvicorn{spec} admits ({lower[0]}) is not vendored in {WHEELS}: "
        f"`pip download --no-deps uvicorn=={lower[0]} -d {WHEELS}`")
    newest = inside[-1]
    if upper[0].minor > 0:  # `<0.N`: the newest allowed is a 0.(N-1).x release
        assert newest.release[:2] == (upper[0].major, upper[0].minor - 1), (
            f"the newest vendored uvicorn in uvicorn{spec} is {newest}: vendor the newest release below {upper[0]}")
    return inside[0], newest


def test_the_range_admits_the_installed_uvicorn_and_its_ends_are_vendored():
    import uvicorn

    spec = uvicorn_requirement().specifier
    oldest, newest = range_ends()
    assert Version(uvicorn.__version__) in spec, f"installed uvicorn {uvicorn.__version__} is outside uvicorn{spec}"
    assert oldest < newest


def unpack(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
    return into


class Child:
    """`serve` in a child process whose uvicorn is the one unpacked in `site` (first on PYTHONPATH)."""

    def __init__(self, index_dir: Path, site: Path, workdir: Path):
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        self.port_file, self.log = workdir / "port", workdir / "serve.log"
        flags = ["--header-timeout-s", HEADER_TIMEOUT_S, "--body-timeout-s", BODY_TIMEOUT_S,
                 "--max-request-bytes", MAX_REQUEST_BYTES, "--max-connections", MAX_CONNECTIONS]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nemo_sdsearch.retrieval", "serve", "--index",
                                          str(index_dir), "--port", "0", "--port-file", str(self.port_file),
                                          *map(str, flags)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.port = None

    def uvicorn_version(self) -> str:
        """The uvicorn this child imports (same interpreter, same PYTHONPATH)."""
        return subprocess.run([sys.executable, "-c", "import uvicorn; print(uvicorn.__version__, uvicorn.__file__)"],
                              env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout.split()

    def wait(self, timeout=60) -> int:
        deadline = time.time() + timeout
        while not self.port_file.exists():
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text(errors="replace")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self.port

    def stop(self):
        interrupt(self.proc)


def http_request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def health(port: int) -> dict:
    import json

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(READ_S)
        s.sendall(http_request("GET", "/health", extra="Connection: close\r\n"))
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return json.loads(body)


def check_limits(port: int, hop) -> None:
    """The representative hardening checks against one server (see the module docstring)."""
    import json

    # a normal answer, twice on one kept-alive connection; then the head deadline closes it
    body = json.dumps({"queries": [hop.query], "topk": 3}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(READ_S)
        for _ in range(2):
            s.sendall(http_request("POST", "/retrieve", body))
            head, rest = read_response(s)
            assert head.startswith(b"HTTP/1.1 200 "), head + rest
            assert hop.evidence in " ".join(d["contents"] for d in json.loads(rest)["result"][0])
        t0 = time.perf_counter()
        assert s.recv(1) == b""
        assert time.perf_counter() - t0 >= HEADER_TIMEOUT_S - 0.05
    # a Content-Length over the cap: 413 from the head alone (a server that waited for the body would answer 408)
    response, _ = exchange(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{\"q", READ_S)
    assert status_and_error(response) == (413, f"the request body has 1000000 bytes; the limit is {MAX_REQUEST_BYTES} "
                                               "(--max-request-bytes)")

    # a slowloris client (one header line every 0.2 s) and an idle one, at once: cut at the header deadline
    def slowloris() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.perf_counter()
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(0.2)
            data, i = b"", 0
            while time.perf_counter() - t0 < READ_S:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    chunk = None
                if chunk == b"":
                    return data, time.perf_counter() - t0
                data += chunk or b""
                try:
                    s.sendall(b"X-Slow-%d: 1\r\n" % i)
                except OSError:
                    pass
                i += 1
            raise AssertionError(f"the slowloris connection was not closed within {READ_S}s: {data[:80]!r}")

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(slowloris)
        idle = pool.submit(exchange, port, b"", READ_S)
        (slow_data, slow_s), (idle_data, idle_s) = slow.result(), idle.result()
    assert status_and_error(slow_data) == (408, f"the request line and headers did not arrive within "
                                                f"{HEADER_TIMEOUT_S}s (--header-timeout-s)")
    assert idle_data == b"" and min(slow_s, idle_s) >= HEADER_TIMEOUT_S - 0.05
    before = health(port)["connections"]
    # the connection cap: a connection beyond it gets 503 at connect (this probe sends nothing)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        response, _ = exchange(port, b"", READ_S)
        assert status_and_error(response) == (503, f"the server holds its limit of {MAX_CONNECTIONS} open "
                                                   "connections (--max-connections); retry shortly")
        for s in held:
            s.settimeout(READ_S)
            assert s.recv(1) == b""  # accepted, then closed by the header deadline
    finally:
        for s in held:
            s.close()
    after = health(port)["connections"]
    assert after["refused_over_max_connections"] - before["refused_over_max_connections"] == 1
    assert after["header_timeouts"] - before["header_timeouts"] == MAX_CONNECTIONS
    assert (after["too_large"], after["body_timeouts"]) == (1, 0)
    # kept-alive + slowloris + idle + held; /health's own connections are closed by the client
    assert after["header_timeouts"] == 3 + MAX_CONNECTIONS and after["open"] == 1


@pytest.mark.slow
def test_server_limits_hold_at_both_ends_of_the_uvicorn_range(corpus_file, tmp_path, bundle):  # noqa: F811
    oldest, newest = range_ends()
    wheels = vendored()
    index = tmp_path / "bm25"
    build_index(corpus_file, index, kind="bm25", progress=False)
    hop = bundle.test[0].hops[0]
    children = {}
    try:
        for version in (oldest, newest):
            work = Path(tempfile.mkdtemp(dir=tmp_path))
            children[version] = Child(index, unpack(wheels[version], work / "site"), work)
        for version, child in children.items():
            assert child.uvicorn_version() == [str(version), str(child.env["PYTHONPATH"].split(os.pathsep)[0]
                                                                  + "/uvicorn/__init__.py")]
            child.wait()
        with ThreadPoolExecutor(len(children)) as pool:  # both at once: the checks mostly wait out deadlines
            for version, future in [(v, pool.submit(check_limits, c.port, hop)) for v, c in children.items()]:
                try:
                    future.result()
                except AssertionError as e:
                    raise AssertionError(f"under uvicorn {version}: {e}") from e
    finally:
        for child in children.values():
            child.stop()
