"""The retrieval service, tested against the real server process on a loopback port (no mocks)."""

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from nemo_sdsearch.retrieval.build import build_index
from nemo_sdsearch.retrieval.client import RetrievalClient, RetrievalError
from nemo_sdsearch.retrieval.index import IndexRetriever


@contextlib.contextmanager
def refusing_port():
    """A loopback port that refuses connections for as long as the block runs: bound by this socket (so no other
    process can take it) but never listening. For clients that must find nothing there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class Server:
    """`python -m nemo_sdsearch.retrieval serve` in a child process; `flags` are extra serve flags (e.g. limits;
    with index_dir=None, the flags name what to serve). Without `port` the child binds a free port itself
    (`--port 0`) and reports it in its `--port-file`: no port is chosen here and released for the child to
    bind (another process could take it in between). With `port`, it serves there (a restart on the same port)."""

    def __init__(self, index_dir, port=None, flags=()):
        self.index_dir, self.requested_port, self.port, self.url = index_dir, port, None, None
        self.flags = [str(f) for f in flags]
        self.proc = None
        self._dir = Path(tempfile.mkdtemp(prefix="retrieval-server-"))
        self.port_file, self.log_file = self._dir / "port", self._dir / "output.log"

    def output(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self, timeout=60):
        source = ["--index", str(self.index_dir)] if self.index_dir is not None else []
        with open(self.log_file, "wb") as log:  # a file, not a pipe: a chatty child never blocks on a full pipe
            self.proc = subprocess.Popen([sys.executable, "-m", "nemo_sdsearch.retrieval", "serve", *source,
                                          "--port", str(self.requested_port or 0), "--port-file", str(self.port_file),
                                          *self.flags], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not self.port_file.exists():  # written once the server accepts connections
            if self.proc.poll() is not None or time.time() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"server did not start (exit status {self.proc.returncode}): {output}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        assert self.requested_port in (None, self.port)
        r = httpx.get(self.url + "/health", timeout=30)
        assert r.status_code == 200, r.text
        return self

    def stop(self):
        if self.proc:
            interrupt(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)


def test_port_zero_is_bound_by_the_server_and_reported(corpus_file, tmp_path, bundle):
    """`serve --port 0`: the child binds a free port itself and reports it, in its "listening on" line and in its
    --port-file (written once it accepts connections, removed when it stops). Two servers started at once get
    two ports, each reported by its own server; the old `--port N` serves on N."""
    out = tmp_path / "bm25"
    build_index(corpus_file, out, kind="bm25", progress=False)
    hop = bundle.test[0].hops[0]
    first, second = Server(out), Server(out)
    try:
        for server in (first, second):
            server.start()
        assert first.port != second.port and 0 not in (first.port, second.port)
        for server in (first, second):
            assert f"retrieval serve: listening on http://127.0.0.1:{server.port}\n" in server.output()
            assert httpx.get(server.url + "/health").json()["status"] == "ok"
            assert hop.evidence in search_contents(server.url, hop.query)
        port = first.port
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(10) == 0 and not first.port_file.exists()  # its port is no longer announced
        assert second.port_file.read_text() == f"{second.port}\n"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")
        again = Server(out, port=port).start()  # backward compatible: --port N binds N
        try:
            assert again.port == port and hop.evidence in search_contents(again.url, hop.query)
        finally:
            again.stop()
    finally:
        first.stop()
        second.stop()


def search_contents(url: str, query: str) -> str:
    r = httpx.post(url + "/retrieve", json={"queries": [query], "topk": 3}, timeout=10)
    assert r.status_code == 200, r.text
    return " ".join(d["contents"] for d in r.json()["result"][0])


@contextlib.contextmanager
def served_in_thread(app, limits):
    """`app` served by uvicorn with `limits` (`uvicorn_config`, as `serve` does) in a thread of this process, on
    a port the server binds itself (port 0): yields that port."""
    import uvicorn

    from nemo_sdsearch.retrieval.server import bound_port, uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        yield bound_port(server)
    finally:
        server.should_exit = True
        thread.join(10)


def evidence_corpus(passages, questions, n):
    """`n` passages of a world in its order, holding the evidence of every hop of `questions` (for dense tests:
    a corpus that is small enough to encode on CPU and still answers those questions, whatever the world's
    size)."""
    needed = {next(i for i, p in enumerate(passages) if h.evidence in p["contents"]) for q in questions for h in q.hops}
    assert len(needed) <= n
    fill = [i for i in range(len(passages)) if i not in needed][:n - len(needed)]
    return [passages[i] for i in sorted(needed | set(fill))]


DENSE_QUESTIONS, DENSE_PASSAGES = 40, 1030


def interrupt(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """Stop a server process as Ctrl-C does (SIGINT: its graceful shutdown), killed after `wait_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def dense_corpus_file(tmp_path_factory, bundle):
    path = tmp_path_factory.mktemp("corpus") / "dense_corpus.jsonl"
    corpus = evidence_corpus(bundle.test_world.passages, bundle.test[:DENSE_QUESTIONS], DENSE_PASSAGES)
    path.write_text("".join(json.dumps(p) + "\n" for p in corpus))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, bundle):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in bundle.test_world.passages))
    return path


@pytest.fixture(scope="module")
def bm25_server(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "bm25"
    build_index(corpus_file, out, kind="bm25", progress=False)
    server = Server(out).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dense_index(dense_corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "dense"
    build_index(dense_corpus_file, out, kind="dense", shard_size=300, progress=False)
    return out


def test_search_r1_wire_format_both_ways(bm25_server, bundle):
    """A client written only from the Search-R1 wire format works unchanged."""
    q = bundle.test[0].hops[0]
    with_scores = httpx.post(bm25_server.url + "/retrieve",
                             json={"queries": [q.query, "zzz qqq"], "topk": 3, "return_scores": True}).json()
    rows = with_scores["result"]
    assert len(rows) == 2 and len(rows[0]) == 3 and rows[1] == []
    first = rows[0][0]
    assert set(first) == {"document", "score"} and set(first["document"]) == {"id", "contents"}
    assert q.evidence in " ".join(d["document"]["contents"] for d in rows[0])
    assert [d["score"] for d in rows[0]] == sorted((d["score"] for d in rows[0]), reverse=True)
    plain = httpx.post(bm25_server.url + "/retrieve", json={"queries": [q.query], "topk": 3, "return_scores": False}).json()
    assert [set(d) for d in plain["result"][0]] == [{"id", "contents"}] * 3
    assert [d["id"] for d in plain["result"][0]] == [d["document"]["id"] for d in rows[0]]


@pytest.mark.parametrize("body, where", [
    ({"queries": [], "topk": 3}, "queries"),
    ({"queries": ["a"], "topk": 0}, "topk"),
    ({"queries": ["a"], "topk": 1000}, "topk"),
    ({"queries": [1, 2]}, "queries.0"),
    ({"queries": "not a list"}, "queries"),
    ({"queries": ["a" * 5000]}, "queries"),
    ({"queries": ["a"] * 600}, "queries"),
    ({"topk": 3}, "queries"),
    ({"queries": ["a"], "top_k": 3}, "top_k"),
    ({"queries": ["a"], "return_scores": "yes"}, "return_scores"),
])
def test_invalid_requests_get_a_clear_400(bm25_server, body, where):
    r = httpx.post(bm25_server.url + "/retrieve", json=body)
    assert r.status_code == 400
    assert r.json()["error"].startswith(where)


def test_not_json_and_wrong_method(bm25_server):
    r = httpx.post(bm25_server.url + "/retrieve", content=b"\xff\x00garbage", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("body")
    assert httpx.get(bm25_server.url + "/retrieve").status_code == 405
    assert httpx.get(bm25_server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_fuzz_malformed_requests_only_4xx(bm25_server):
    """5,000 generated malformed bodies: every answer is a 4xx, and the server stays healthy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                     st.text(max_size=20))
    junk = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=8)
    bad_body = st.one_of(
        junk.filter(lambda x: not isinstance(x, dict) or not isinstance(x.get("queries"), list)),
        st.fixed_dictionaries({"queries": st.lists(st.one_of(st.integers(), st.none(), st.lists(st.text())), min_size=1, max_size=3)}),
        st.fixed_dictionaries({"queries": st.just(["ok"]), "topk": st.one_of(st.integers(max_value=0), st.integers(min_value=101), st.text())}),
        st.fixed_dictionaries({"queries": st.just(["ok"]), "unexpected": junk}),
    )
    raw = st.binary(max_size=40).map(lambda b: b"\x00" + b)
    codes = []
    client = httpx.Client(base_url=bm25_server.url)

    @settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(bad_body.map(lambda b: json.dumps(b).encode()), raw))
    def fuzz(content):
        r = client.post("/retrieve", content=content, headers={"content-type": "application/json"})
        codes.append(r.status_code)
        assert 400 <= r.status_code < 500, (content, r.status_code, r.text)

    fuzz()
    assert len(codes) >= 5000
    assert client.get("/health").json()["status"] == "ok"
    client.close()


@pytest.mark.slow
def test_load_5000_requests_concurrency_64(bm25_server, bundle):
    """Sustained load (about 80 requests per connection) with no error, every query counted once, and batching
    at work. Throughput is bench/retrieval.py's job; the pure-Python client sets this test's time (~90 req/s)."""
    queries = [h.query for q in bundle.test for h in q.hops]

    async def load():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=bm25_server.url, limits=limits, timeout=60) as client:
            sem = asyncio.Semaphore(64)
            errors = 0

            async def one(i):
                nonlocal errors
                async with sem:
                    r = await client.post("/retrieve", json={"queries": [queries[i % len(queries)]], "topk": 3})
                    if r.status_code != 200 or len(r.json()["result"]) != 1:
                        errors += 1

            await asyncio.gather(*(one(i) for i in range(5_000)))
            return errors

    before = httpx.get(bm25_server.url + "/health").json()
    assert asyncio.run(load()) == 0
    after = httpx.get(bm25_server.url + "/health").json()
    assert after["queries"] - before["queries"] == 5_000
    # Dynamic batching coalesced concurrent requests.
    assert after["batches"] - before["batches"] < 5_000


def test_client_survives_a_server_restart(corpus_file, tmp_path, bundle):
    out = tmp_path / "bm25"
    build_index(corpus_file, out, kind="bm25", progress=False)
    server = Server(out).start()
    client = RetrievalClient(server.url, timeout_s=5, max_wait_s=60, backoff_s=0.1)
    q = bundle.test[0].hops[0]
    assert q.evidence in client.search([q.query], 3)[0][0].contents
    server.stop()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("docs", client.search([q.query], 3)))
    t.start()
    deadline = time.time() + 30
    while client.retries == 0 and time.time() < deadline:  # until the client is retrying against the dead port
        time.sleep(0.05)
    restarted = Server(out, server.port).start()
    try:
        t.join(60)
        assert q.evidence in results["docs"][0][0].contents and client.retries > 0
        with pytest.raises(RetrievalError, match="rejected"):
            client.search([q.query], 0)
    finally:
        client.close()
        restarted.stop()
    with refusing_port() as port:
        dead = RetrievalClient(f"http://127.0.0.1:{port}", max_wait_s=0.5, backoff_s=0.1)
        with pytest.raises(RetrievalError, match="unreachable"):
            dead.search(["x"], 3)


def test_a_cluster_sized_turn_is_split_under_the_servers_cap(bm25_server, corpus_file, tmp_path, bundle):
    """2,000 queries in one turn (a TensorRT-LLM replica's finished rows): the service takes at most 512 per
    request (`--max-queries`), so the client splits them (256 per request by default, and never more than the
    service reports in /health), sends the requests concurrently, and returns every row in query order."""
    queries = [h.query for q in bundle.test for h in q.hops]
    queries = (queries * (2000 // len(queries) + 1))[:2000]
    client = RetrievalClient(bm25_server.url, timeout_s=30, max_wait_s=60)
    before = httpx.get(bm25_server.url + "/health").json()
    try:
        rows = client.search(queries, 3)
    finally:
        client.close()
    after = httpx.get(bm25_server.url + "/health").json()
    assert before["limits"]["max_queries"] == 512
    assert len(rows) == 2000 and client.requests == 8 and client.retries == 0
    assert after["queries"] - before["queries"] == 2000
    one = RetrievalClient(bm25_server.url)
    try:
        for i in (0, 255, 256, 1023, 1999):  # rows stay in query order across request boundaries
            assert [d.id for d in rows[i]] == [d.id for d in one.search([queries[i]], 3)[0]], i
        last = [d.id for d in one.search([queries[1999]], 3)[0]]
    finally:
        one.close()

    out = tmp_path / "bm25"
    build_index(corpus_file, out, kind="bm25", progress=False)
    capped = Server(out, flags=["--max-queries", 100]).start()
    client = RetrievalClient(capped.url, timeout_s=30, max_wait_s=60)
    try:
        rows = client.search(queries, 3)
        assert len(rows) == 2000 and client.max_queries_per_request == 100 and client.requests == 20
        assert [d.id for d in rows[1999]] == last
    finally:
        client.close()
        capped.stop()
    # the byte budget splits too: long queries, few per request
    small = RetrievalClient("http://127.0.0.1:1", max_request_bytes=1000)
    assert [len(c) for c in small.split(["x" * 400] * 5)] == [2, 2, 1]
    assert small.split([]) == [[]] and [len(c) for c in small.split(["y" * 5000])] == [1]


def test_dense_index_build_resume_and_search(dense_index, dense_corpus_file, bundle):
    meta = json.loads((dense_index / "meta.json").read_text())
    assert meta["complete"] and meta["num_passages"] == DENSE_PASSAGES and meta["dim"] == 384
    shards = sorted((dense_index / "emb").glob("shard_*.npy"))
    assert len(shards) == 4
    # Interrupt a build: the last shard is gone and meta is not complete. Resuming encodes only it.
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    shards[-1].unlink()
    meta["complete"] = False
    (dense_index / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="did not finish"):
        IndexRetriever(dense_index)
    build_index(dense_corpus_file, dense_index, kind="dense", shard_size=300, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((dense_index / "emb").glob("shard_*.npy"))[:-1]} == mtimes
    r = IndexRetriever(dense_index)
    hops = [h for q in bundle.test[:DENSE_QUESTIONS] for h in q.hops]
    res = r.search([h.query for h in hops], 3)
    assert sum(any(h.evidence in d.contents for d in docs) for h, docs in zip(hops, res)) / len(hops) >= 0.95


def test_bad_index_dir_and_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        IndexRetriever(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "contents": "\\"T\\"\\nx"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_index(bad, tmp_path / "out", kind="bm25", progress=False)
    from nemo_sdsearch.retrieval.__main__ import main

    assert main(["serve", "--index", str(tmp_path / "nope")]) == 2


def test_cli_eval_through_the_service_gives_the_in_process_answers(bm25_server, corpus_file, bundle, tmp_path):
    """`sdsearch eval --retrieval-url` (two benchmark files, Table 1 layout) equals the in-process BM25 run."""
    import json

    from nemo_sdsearch.cli import main
    from nemo_sdsearch.world.assets import default_model_dir

    files = []
    for name, qs in (("nq_test", bundle.test[:4]), ("hotpotqa_test", bundle.test[4:8])):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps(q.to_flashrag()) + "\n" for q in qs))
        files.append(str(f))
    common = ["eval", "--data", *files, "--model", str(default_model_dir()), "--max-new-tokens", "24", "--quiet",
              "--threads", "1"]
    assert main([*common, "--retrieval-url", bm25_server.url, "--out", str(tmp_path / "svc")]) == 0
    assert main([*common, "--corpus", str(corpus_file), "--out", str(tmp_path / "local")]) == 0
    svc = json.loads((tmp_path / "svc" / "results.json").read_text())
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    assert svc["predictions"] == local["predictions"] and svc["scores"] == local["scores"]
    text = (tmp_path / "svc" / "results.md").read_text()
    assert text.startswith("EM x 100 (Table 1 layout)") and "| NQ | HotpotQA | Avg. |" in text
