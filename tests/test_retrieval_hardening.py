"""Hardening of the retrieval service (issue 13): stalled and oversized clients against the real server on a
loopback port, index rebuilds that can neither keep a stale corpus nor destroy a working index, and corpus
lines that are not UTF-8. Timeouts are set short through the server's own flags so that each test takes
seconds.

No check here depends on the machine being fast (issue 24): what the server did is read from its own counters
in /health (connections closed by each deadline, refused, too large) and from its own clock (how long the
connections a deadline closed had waited, `header_timeout_waits` / `body_timeout_waits`). Wall-clock bounds
are lower bounds (nothing is closed before its deadline: a slow machine only makes things later) and generous
upper ones (`LATE_S`: the deadline fired at all)."""

import asyncio
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import httpx
import pytest

from nemo_sdsearch.retrieval import BM25Retriever, load_corpus
from nemo_sdsearch.retrieval.base import CorpusError
from nemo_sdsearch.retrieval.build import build_index
from nemo_sdsearch.retrieval.client import RetrievalClient
from nemo_sdsearch.retrieval.index import IndexRetriever, staging_dir
from nemo_sdsearch.retrieval.server import Limits, create_app
from test_retrieval_service import Server, corpus_file, served_in_thread  # noqa: F401 - corpus_file is a fixture

# The header timeout is also the window in which a test must set up what it checks (open 120 connections and
# be answered meanwhile; fill the connection cap and probe it): 2 s leaves it ample on a loaded 2-core box.
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 100_000
MAX_CONNECTIONS = 160
EARLY_S = 0.05  # clock granularity on client-side lower bounds (a client's clock starts before the deadline)
LATE_S = 10.0  # how late a deadline may fire on a loaded machine: generous, the counters carry the checks
READ_S = HEADER_TIMEOUT_S + LATE_S + 5  # how long a client waits for the server to close its connection
TOLERANCE_S = 1e-6  # the server's measured waits are differences of loop times: rounding only


@pytest.fixture(scope="module")
def guarded(corpus_file, tmp_path_factory):  # noqa: F811 - the fixture imported above
    out = tmp_path_factory.mktemp("idx") / "bm25"
    build_index(corpus_file, out, kind="bm25", progress=False)
    server = Server(out, flags=["--header-timeout-s", HEADER_TIMEOUT_S, "--body-timeout-s", BODY_TIMEOUT_S,
                                "--max-request-bytes", MAX_REQUEST_BYTES, "--max-connections", MAX_CONNECTIONS]).start()
    yield server
    server.stop()


def health(server) -> dict:
    """/health over a connection of its own, closed after the answer (so it is not counted as open later)."""
    r = httpx.get(server.url + "/health", headers={"connection": "close"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def exchange(port: int, data: bytes, timeout: float = READ_S) -> tuple[bytes, float]:
    """Send `data` on a fresh connection and read until the server closes it: (all bytes read, seconds)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(data)
        s.settimeout(timeout)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.perf_counter() - t0


def status_and_error(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def assert_waits_on_time(waits: dict, timeout_s: float) -> None:
    """The server's own measure of how long the connections a deadline closed had waited (`Waits`): never less
    than the timeout, and no more than the timeout plus how late its timer fired (exact, however slow the
    machine: a deadline set to another value, or moved later, fails it); the lateness itself only generously
    bounded."""
    assert waits["min_s"] is not None, "no connection was closed by this deadline"
    assert timeout_s - TOLERANCE_S <= waits["min_s"] <= waits["max_s"], waits
    assert waits["max_s"] <= timeout_s + waits["late_max_s"] + TOLERANCE_S, waits
    assert 0 <= waits["late_max_s"] <= LATE_S, waits


# -- stalled, slow and oversized clients ---------------------------------------------------------------------

def test_idle_and_slowloris_connections_are_closed_at_the_header_timeout(guarded, bundle):
    """100 connections that send nothing and 20 that send one header line every 0.5 s are all closed by the
    header deadline (the server counts 120 header timeouts, each after waiting the header timeout by its own
    clock; none was closed before it); a client on another connection is answered while they are held."""
    hop = bundle.test[0].hops[0]
    before = health(guarded)["connections"]

    async def attack():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        # Times run from before connecting: the server's deadline starts when it accepts, which is later.
        async def idle():
            t0 = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
            data = await asyncio.wait_for(reader.read(), READ_S)
            writer.close()
            return loop.time() - t0, data

        async def slowloris():
            t0 = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
            writer.write(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")

            async def drip():
                for i in range(100):
                    await asyncio.sleep(0.5)
                    if reader.at_eof():
                        return
                    writer.write(b"X-Slow-%d: 1\r\n" % i)

            dripping = loop.create_task(drip())
            data = await asyncio.wait_for(reader.read(), READ_S)
            elapsed = loop.time() - t0
            dripping.cancel()
            writer.close()
            return elapsed, data

        async def client():
            answers = []  # (health status, retrieve status, evidence found, open connections the health counted)
            async with httpx.AsyncClient(base_url=guarded.url, timeout=READ_S) as c:
                while not done.is_set():
                    h = await c.get("/health")
                    r = await c.post("/retrieve", json={"queries": [hop.query], "topk": 3})
                    found = r.status_code == 200 and hop.evidence in " ".join(d["contents"] for d in r.json()["result"][0])
                    answers.append((h.status_code, r.status_code, found, h.json()["connections"]["open"]))
                    await asyncio.sleep(0.05)
            return answers

        watcher = loop.create_task(client())
        results = await asyncio.gather(*(idle() for _ in range(100)), *(slowloris() for _ in range(20)))
        done.set()
        return results[:100], results[100:], await watcher

    idle, slow, answers = asyncio.run(attack())
    idle_s, slow_s = [e for e, _ in idle], [e for e, _ in slow]
    after = health(guarded)["connections"]
    print(f"\nidle closed after {min(idle_s):.3f}..{max(idle_s):.3f}s, slowloris after {min(slow_s):.3f}.."
          f"{max(slow_s):.3f}s by the client's clock, {after['header_timeout_waits']} by the server's (header "
          f"timeout {HEADER_TIMEOUT_S}s); {len(answers)} health+retrieve rounds meanwhile, at most "
          f"{max(a[3] for a in answers)} connections open")
    assert all(data == b"" for _, data in idle)  # nothing of a request arrived: closed without an answer
    assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in slow)
    assert status_and_error(slow[0][1])[1] == (f"the request line and headers did not arrive within "
                                               f"{HEADER_TIMEOUT_S}s (--header-timeout-s)")
    for elapsed in idle_s + slow_s:
        assert HEADER_TIMEOUT_S - EARLY_S <= elapsed <= HEADER_TIMEOUT_S + LATE_S
    assert after["header_timeouts"] - before["header_timeouts"] == 120
    assert_waits_on_time(after["header_timeout_waits"], HEADER_TIMEOUT_S)
    assert after["open"] == 1  # the /health request itself
    # answered all along, and while the attack's connections were held: the server counted them open meanwhile
    assert len(answers) >= 2 and all(a[:3] == (200, 200, True) for a in answers)
    assert max(a[3] for a in answers) >= 100


def test_a_client_still_writing_when_refused_reads_the_whole_answer(guarded):
    """The server half-closes after a refusal and drops what still arrives (lingering close): closing a
    socket with unread input sends RST, which can destroy the 408 in the client's buffer before it is read.
    These clients write a header line every 10 ms, so input is always pending when the deadline fires."""
    def stubborn() -> bytes:
        with socket.create_connection(("127.0.0.1", guarded.port)) as s:
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(0.01)
            data, i = b"", 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < READ_S:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    chunk = None
                if chunk == b"":
                    return data  # end of stream after the answer
                if chunk:
                    data += chunk
                try:
                    s.sendall(b"X-Slow-%d: %s\r\n" % (i, b"y" * 200))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # our writes may be refused once the server has closed; the answer must still be read
                i += 1
            raise AssertionError(f"no end of stream after {READ_S}s; read {data[:80]!r}")

    results: list = [None] * 8
    def run(k):
        try:
            results[k] = stubborn()
        except Exception as e:  # noqa: BLE001 - reported below, with which client
            results[k] = e
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert isinstance(r, bytes), f"{type(r).__name__}: {r}"
        assert r.startswith(b"HTTP/1.1 408 "), r[:80]
        assert status_and_error(r)[1].startswith("the request line and headers did not arrive within")


def test_short_body_gets_408_at_the_body_timeout(guarded):
    """A body shorter than its Content-Length: 408 naming what arrived, from the body deadline (counted as a body
    timeout, after waiting the body timeout by the server's clock), not before it."""
    before = health(guarded)["connections"]
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 90000\r\n\r\n"
    response, elapsed = exchange(guarded.port, head + b"x" * 1000)
    after = health(guarded)["connections"]
    print(f"\nshort body answered after {elapsed:.3f}s by the client's clock, {after['body_timeout_waits']} by the "
          f"server's (body timeout {BODY_TIMEOUT_S}s)")
    assert status_and_error(response) == (408, f"the request body did not arrive within {BODY_TIMEOUT_S}s "
                                                "(--body-timeout-s): got 1000 of 90000 bytes")
    assert BODY_TIMEOUT_S - EARLY_S <= elapsed <= BODY_TIMEOUT_S + LATE_S
    assert after["body_timeouts"] - before["body_timeouts"] == 1
    assert after["header_timeouts"] == before["header_timeouts"]
    assert_waits_on_time(after["body_timeout_waits"], BODY_TIMEOUT_S)


def test_oversized_bodies_get_413_before_they_are_read(guarded):
    """A Content-Length over the cap is refused from the headers alone (the issue's probe: 1,000,000 announced,
    less sent: a server that waited for the body would answer 408 at the body deadline, and count it); a chunked
    body is refused as soon as its bytes pass the cap."""
    before = health(guarded)["connections"]
    for announced in (1_000_000, 10**12):
        head = f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n".encode()
        response, _ = exchange(guarded.port, head + b'{"queries": ["')
        assert status_and_error(response) == (413, f"the request body has {announced} bytes; the limit is "
                                                   f"{MAX_REQUEST_BYTES} (--max-request-bytes)")
    chunked = (b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % MAX_REQUEST_BYTES + b"x" * MAX_REQUEST_BYTES + b"\r\n" + b"a\r\n" + b"y" * 10)
    response, elapsed = exchange(guarded.port, chunked)
    assert status_and_error(response) == (413, f"the request body exceeds {MAX_REQUEST_BYTES} bytes "
                                               "(--max-request-bytes)")
    huge_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (Limits().max_header_bytes + 1)
    response, _ = exchange(guarded.port, huge_head)
    assert status_and_error(response)[0] == 431
    after = health(guarded)["connections"]
    assert after["too_large"] - before["too_large"] == 4
    assert (after["body_timeouts"], after["header_timeouts"]) == (before["body_timeouts"], before["header_timeouts"])


def test_connections_beyond_the_cap_get_503_until_the_header_timeout_frees_them(guarded, bundle):
    """At the cap every new connection (a /health probe too) is answered 503 at connect (the raw probe sends
    nothing: only a refusal at connect answers it); the held ones are closed by the header deadline, and a
    retrying client started during the flood gets its answer once they are."""
    hop = bundle.test[0].hops[0]
    before = health(guarded)["connections"]
    assert before["open"] == 1
    t_start = time.perf_counter()  # before the first held connection: none can be closed before t_start + timeout
    held = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(MAX_CONNECTIONS)]
    response, _ = exchange(guarded.port, b"")
    assert status_and_error(response) == (503, f"the server holds its limit of {MAX_CONNECTIONS} open "
                                               "connections (--max-connections); retry shortly")
    assert b"\r\nretry-after: 1\r\n" in response
    assert httpx.get(guarded.url + "/health", timeout=5).status_code == 503
    client = RetrievalClient(guarded.url, timeout_s=READ_S, max_wait_s=READ_S + 30, backoff_s=0.1, max_backoff_s=0.2)
    try:
        docs = client.search([hop.query], 3)[0]
    finally:
        client.close()
    waited = time.perf_counter() - t_start
    print(f"\nretrying client answered {waited:.3f}s after the held connections were opened, after {client.retries} "
          "retries")
    assert hop.evidence in " ".join(d.contents for d in docs)
    assert HEADER_TIMEOUT_S - EARLY_S <= waited <= HEADER_TIMEOUT_S + LATE_S
    for s in held:
        s.settimeout(READ_S)
        assert s.recv(1) == b""  # closed by the header timeout (accepted, not refused: no 503 on these)
        s.close()
    after = health(guarded)["connections"]
    # refused: the raw probe, the /health probe, the client's one /health read of the limits, its retries
    assert after["refused_over_max_connections"] - before["refused_over_max_connections"] == 3 + client.retries
    assert after["header_timeouts"] - before["header_timeouts"] == MAX_CONNECTIONS
    assert_waits_on_time(after["header_timeout_waits"], HEADER_TIMEOUT_S)


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length from `s`: (head, body). The end of the stream before it is complete
    is an error (not an endless loop of empty reads)."""
    def more() -> bytes:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection in the middle of a response: {data!r}")
        return chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += more()
    return head, body


class SlowBM25(BM25Retriever):
    """The real BM25 retriever answering after `delay_s`: a search slower than the header timeout."""

    delay_s = 1.5

    def search(self, queries, topk=3):
        time.sleep(self.delay_s)  # the batcher's worker thread
        return super().search(queries, topk)


def test_keep_alive_and_slow_answers_are_not_cut(bundle):
    """Through the server factory (`create_app` + `uvicorn_config`) with a 1 s header timeout: an answer that
    takes 1.5 s is delivered (no deadline runs while the server answers), a second request on the kept-alive
    connection is answered, and the connection is then closed by the header deadline: one header timeout (by
    the server's clock) after the last answer, the only deadline that fired."""
    header_timeout_s = 1.0
    limits = Limits(header_timeout_s=header_timeout_s, body_timeout_s=BODY_TIMEOUT_S)
    app = create_app(SlowBM25(bundle.test_world.passages), limits)
    hop = bundle.test[0].hops[0]
    body = json.dumps({"queries": [hop.query], "topk": 3}).encode()
    request = (b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body
    with served_in_thread(app, limits) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(READ_S)
        times = []
        for i in range(2):
            if i:
                time.sleep(0.1)  # idle, well within the header timeout
            t_sent = time.perf_counter()
            s.sendall(request)
            head, rest = read_response(s)
            times.append(time.perf_counter() - t_sent)
            assert head.startswith(b"HTTP/1.1 200 "), head + rest
            assert hop.evidence in rest.decode()
        assert s.recv(1) == b""
        closed_after_send = time.perf_counter() - t_sent
        stats = app.state.connections
        print(f"\nanswers after {times[0]:.3f}s and {times[1]:.3f}s on one connection; closed {closed_after_send:.3f}s "
              f"after the last request was sent; the server measured {stats.header_timeout_waits} of waiting")
        # by the client's clock, only lower bounds (each step waits for the one before) and generous upper ones
        assert all(SlowBM25.delay_s <= t < SlowBM25.delay_s + LATE_S for t in times)
        assert SlowBM25.delay_s + header_timeout_s <= closed_after_send <= SlowBM25.delay_s + header_timeout_s + LATE_S
        # by the server's: closed by the header deadline, once, after waiting the header timeout from the answer
        assert (stats.header_timeouts, stats.body_timeouts) == (1, 0)
        assert_waits_on_time(asdict(stats.header_timeout_waits), header_timeout_s)
        assert app.state.batcher.batches == 2 and app.state.batcher.queries == 2


def test_limits_are_flags_with_checked_values_and_documented_defaults(tmp_path, capsys):
    from nemo_sdsearch.retrieval.__main__ import main

    assert main(["serve", "--index", str(tmp_path), "--header-timeout-s", "0"]) == 2
    assert "--header-timeout-s must be a positive number, not 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-connections must be a positive number, not -1"):
        Limits(max_connections=-1)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "retrieval.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `--") and len(cells) >= 3:
            rows[cells[0].strip("`")] = float(cells[1].split()[0].replace(",", ""))
    assert rows == {"--" + f.name.replace("_", "-"): float(f.default) for f in fields(Limits)}


# -- index rebuilds ---------------------------------------------------------------------------------------------

def write_corpus(path: Path, word: str, n: int = 40) -> bytes:
    data = "".join(json.dumps({"id": i, "contents": f'"Entity {i}"\nEntity {i} keeps the {word} of room{i:02d}.'})
                   + "\n" for i in range(n)).encode()
    path.write_bytes(data)
    return data


def search(url: str, query: str) -> list:
    r = httpx.post(url + "/retrieve", json={"queries": [query], "topk": 3, "return_scores": True}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["result"][0]


def index_bytes(index_dir: Path) -> dict:
    return {str(p.relative_to(index_dir)): p.read_bytes() for p in sorted(index_dir.rglob("*")) if p.is_file()}


def test_same_size_different_corpus_is_rebuilt_and_served(tmp_path):
    """The issue's case: a second corpus of the same byte size (here even the same path and mtime) rebuilt into
    the directory replaces the passages; the same corpus again is found up to date."""
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "idx"
    old = write_corpus(corpus, "amber")
    assert build_index(corpus, out, kind="bm25", progress=False)["corpus"]["sha256"] == hashlib.sha256(old).hexdigest()
    mtime = corpus.stat().st_mtime_ns
    new = write_corpus(corpus, "coral")
    os.utime(corpus, ns=(mtime, mtime))
    assert len(new) == len(old) and new != old
    meta = build_index(corpus, out, kind="bm25", progress=False)
    assert "unchanged" not in meta and meta["corpus"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert (out / "corpus.jsonl").read_bytes() == new
    assert build_index(corpus, out, kind="bm25", progress=False)["unchanged"] is True
    server = Server(out).start()
    try:
        hits = search(server.url, "coral room07")
        assert hits[0]["document"]["contents"] == '"Entity 7"\nEntity 7 keeps the coral of room07.'
        assert search(server.url, "amber") == []
    finally:
        server.stop()


def test_failed_rebuild_leaves_the_old_index_serving_byte_for_byte(tmp_path, capsys):
    from nemo_sdsearch.retrieval.__main__ import main

    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "idx"
    write_corpus(good, "amber")
    build_index(good, out, kind="bm25", progress=False)
    files = index_bytes(out)
    server = Server(out).start()
    try:
        answer = search(server.url, "amber room12")
        assert answer[0]["document"]["id"] == "12"
        lines = good.read_text().splitlines(keepends=True)
        bad.write_text("".join(lines[:6]) + '{"id": 6, "contents": \n' + "".join(lines[7:]))
        assert main(["build", "--corpus", str(bad), "--out", str(out), "--kind", "bm25"]) == 2
        assert f"{bad}:7: not valid JSON" in capsys.readouterr().err
        assert index_bytes(out) == files and not staging_dir(out).exists()
        assert search(server.url, "amber room12") == answer  # the running server never noticed
    finally:
        server.stop()
    restarted = Server(out).start()  # and a fresh one serves the same index
    try:
        assert search(restarted.url, "amber room12") == answer
    finally:
        restarted.stop()


def test_leftover_builds_are_cleaned_up_or_finished(tmp_path):
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "idx"
    write_corpus(corpus, "amber")
    stage = staging_dir(out)
    stage.mkdir()
    (stage / "meta.json").write_text(json.dumps({"kind": "bm25", "corpus": {"sha256": "0" * 64, "size_bytes": 1}}))
    (stage / "corpus.jsonl").write_text("left over from another corpus\n")
    build_index(corpus, out, kind="bm25", progress=False)
    assert not stage.exists() and IndexRetriever(out).search(["amber room03"], 1)[0][0].id == "3"
    files = index_bytes(out)
    out.rename(tmp_path / ".idx.old")  # a two-rename swap that stopped between its renames
    assert build_index(corpus, out, kind="bm25", progress=False)["unchanged"] is True
    assert index_bytes(out) == files and not (tmp_path / ".idx.old").exists()
    with pytest.raises(ValueError, match="is not an index directory"):
        build_index(corpus, tmp_path, kind="bm25", progress=False)  # never replaces a directory of other files


def test_rebuild_where_directories_cannot_be_exchanged_atomically(tmp_path, monkeypatch):
    """The two-rename swap (filesystems without RENAME_EXCHANGE) also ends with only the new index."""
    from nemo_sdsearch.retrieval import build

    monkeypatch.setattr(build, "_exchange", lambda a, b: False)
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "idx"
    write_corpus(corpus, "amber")
    build_index(corpus, out, kind="bm25", progress=False)
    write_corpus(corpus, "coral")
    build_index(corpus, out, kind="bm25", progress=False)
    assert IndexRetriever(out).search(["coral room09"], 1)[0][0].contents.endswith("coral of room09.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "corpus.jsonl", "idx"]


def test_serve_on_an_incomplete_or_damaged_index_names_the_directory_and_the_rebuild(tmp_path, capsys):
    from nemo_sdsearch.retrieval.__main__ import main

    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "idx"
    write_corpus(corpus, "amber")
    build_index(corpus, out, kind="bm25", progress=False)
    command = f"python -m nemo_sdsearch.retrieval build --corpus {corpus} --out {out} --kind bm25"
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    proc = subprocess.run([sys.executable, "-m", "nemo_sdsearch.retrieval", "serve", "--index", str(out), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"retrieval serve: error: {out}: the index build did not finish (meta.json says "
                                   f"complete: false); run the build again to resume it: `{command}`")
    assert main(shlex.split(command)[3:]) == 0  # the command it names repairs the index
    assert IndexRetriever(out).search(["amber room05"], 1)[0][0].id == "5"
    (out / "bm25" / "vocab.index.json").unlink()
    assert main(["serve", "--index", str(out), "--port", "0"]) == 2
    assert (f"{out}: index file bm25/vocab.index.json is missing; the index is damaged: rebuild it with "
            f"`{command}`") in capsys.readouterr().err
    assert main(shlex.split(command)[3:]) == 0
    assert IndexRetriever(out).search(["amber room05"], 1)[0][0].id == "5"
    out.rename(staging_dir(out))  # as if the first build into `out` had stopped before its swap
    with pytest.raises(FileNotFoundError, match=f"its partial build is in {staging_dir(out)}"):
        IndexRetriever(out)


# -- encodings ----------------------------------------------------------------------------------------------------

def test_non_utf8_corpus_lines_are_reported_with_file_and_line(tmp_path, capsys, bundle):
    from nemo_sdsearch.cli import main as sdsearch
    from nemo_sdsearch.retrieval.__main__ import main

    lines = [json.dumps({"id": i, "contents": f'"Entity {i}"\ntext {i}'}).encode() for i in range(5)]
    lines[2] = json.dumps({"id": 2, "contents": '"Café"\nCafé society'}, ensure_ascii=False).encode("latin-1")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    column = lines[2].index(b"\xe9") + 1
    message = f"{bad}:3: not valid UTF-8 (byte 0xe9 at column {column})"
    for load in (lambda: build_index(bad, tmp_path / "idx", kind="bm25", progress=False), lambda: load_corpus(bad)):
        with pytest.raises(CorpusError) as err:
            load()
        assert str(err.value).startswith(message)
    assert main(["build", "--corpus", str(bad), "--out", str(tmp_path / "idx"), "--kind", "bm25"]) == 2
    assert message in capsys.readouterr().err
    questions = tmp_path / "nq_test.jsonl"
    questions.write_text(json.dumps(bundle.test[0].to_flashrag()) + "\n")
    assert sdsearch(["eval", "--data", str(questions), "--corpus", str(bad), "--quiet"]) == 2
    assert message in capsys.readouterr().err
