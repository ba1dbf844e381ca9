"""Retrieval service latency and throughput: our server (async, dynamic batching) against a Search-R1-style
server (synchronous endpoint, one encode per request), same encoder (bundled MiniLM), same FAISS flat index
and corpus, side by side in one run on loopback, at concurrency 1, 8, 32 and 64; and against the ceiling: the
same retriever answering the same queries in batches of 64 with no HTTP at all (encode + search, in its own
process with the cores to itself), the most any server of this encoder could deliver.

Targets: at concurrency 1 ours answers at least as fast as the Search-R1-style server (p50 ratio <= 1); at 32
at least 3x its QPS; at 64 at least 0.85 of the ceiling's QPS.

    python bench/retrieval.py [--requests 600] [--corpus FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
from nemo_sdsearch.core.targets import target_line  # noqa: E402

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server {cmd} did not start")


class _Conn:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams: the load generator shares the 2 cores
    with the server under test, so it must cost as little as possible (httpx costs about a core at a
    few hundred requests per second). The same client drives both servers."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self.host.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"connection" and v.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, queries: list[str], concurrency: int, n: int) -> dict:
    host, port = url.split("//")[1].split(":")
    lat, errors = [], 0
    bodies = [json.dumps({"queries": [q], "topk": 3, "return_scores": True}).encode() for q in queries]

    async def worker(conn: _Conn, jobs: list[int]):
        nonlocal errors
        for i in jobs:
            t0 = time.perf_counter()
            try:
                status = await asyncio.wait_for(conn.post("/retrieve", bodies[i % len(bodies)]), 120)
                errors += status != 200
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                conn.close()
            lat.append(time.perf_counter() - t0)

    async def run(total: int):
        conns = [_Conn(host, int(port)) for _ in range(concurrency)]
        await asyncio.gather(*(worker(c, list(range(w, total, concurrency))) for w, c in enumerate(conns)))
        for c in conns:
            c.close()

    await run(min(concurrency * 4, n))  # warm-up
    lat.clear()
    errors = 0
    t0 = time.perf_counter()
    await run(n)
    wall = time.perf_counter() - t0
    return {"qps": n / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), "errors": errors}


CONCURRENCY = (1, 8, 32, 64)


def ceiling(index: Path, queries: list[str], batch: int, n: int) -> float:
    """Queries per second of the retriever alone (no HTTP, no event loop): `n` queries in batches of `batch`,
    after one untimed batch, in a subprocess (its own threads, nothing else running)."""
    code = ("import json, sys, time\n"
            "from nemo_sdsearch.retrieval.index import IndexRetriever\n"
            "index, batch, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
            "qs = json.loads(sys.stdin.read())\n"
            "r = IndexRetriever(index)\n"
            "r.search(qs[:batch], 3)\n"
            "t0 = time.perf_counter()\n"
            "for i in range(0, n, batch):\n"
            "    r.search([qs[j % len(qs)] for j in range(i, min(n, i + batch))], 3)\n"
            "print(n / (time.perf_counter() - t0))\n")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code, str(index), str(batch), str(n)], input=json.dumps(queries),
                       capture_output=True, text=True, env=env, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def main():
    from nemo_sdsearch.world.assets import default_bundle
    from nemo_sdsearch.retrieval.build import build_index

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--corpus", help="corpus jsonl (default: the bundled test world)")
    ap.add_argument("--smoke", action="store_true", help="40 requests over 200 passages: the bench runs end to end")
    args = ap.parse_args()
    if args.smoke:
        args.requests = 40
    bundle = default_bundle()
    queries = [h.query for q in bundle.test for h in q.hops]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus.jsonl"
        if not args.corpus:
            passages = bundle.test_world.passages[:200] if args.smoke else bundle.test_world.passages
            corpus.write_text("".join(json.dumps(p) + "\n" for p in passages))
        index = Path(tmp) / "index"
        build_index(corpus, index, kind="dense", progress=False)
        results = {}
        for name, script in (("ours", ["-m", "nemo_sdsearch.retrieval", "serve"]),
                             ("search_r1_style", [str(HERE / "search_r1_style_server.py")])):
            port = free_port()
            proc = start([sys.executable, *script, "--index", str(index), "--port", str(port)], port)
            try:
                for c in CONCURRENCY:
                    n = args.requests if c > 1 else max(10 if args.smoke else 100, args.requests // 4)
                    results[(name, c)] = asyncio.run(load(f"http://127.0.0.1:{port}", queries, c, n))
            finally:
                proc.terminate()
                proc.wait(10)
        top = CONCURRENCY[-1]
        ceiling_qps = ceiling(index, queries, top, args.requests)
    print(f"dense retrieval (bundled MiniLM + FAISS flat), one query per request, topk 3, {os.cpu_count()} cores")
    print(f"{'concurrency':>11s} | {'ours QPS':>9s} {'p50 ms':>7s} {'p99 ms':>7s} | {'S-R1 QPS':>9s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s} | {'QPS ratio':>9s}")
    for c in CONCURRENCY:
        o, b = results[("ours", c)], results[("search_r1_style", c)]
        print(f"{c:11d} | {o['qps']:9.1f} {o['p50_ms']:7.1f} {o['p99_ms']:7.1f} | {b['qps']:9.1f} {b['p50_ms']:7.1f} "
              f"{b['p99_ms']:7.1f} | {o['qps'] / b['qps']:9.2f}")
    print("errors per run: " + ", ".join(f"{n} c={c}: {r['errors']}" for (n, c), r in results.items()))
    print(f"ceiling: the retriever alone, batches of {top} queries, no HTTP: {ceiling_qps:.1f} QPS")
    print(target_line("retrieval_latency_ratio_c1",
                      results[("ours", 1)]["p50_ms"] / results[("search_r1_style", 1)]["p50_ms"], "<=", 1.0))
    print(target_line("retrieval_qps_ratio_c32", results[("ours", 32)]["qps"] / results[("search_r1_style", 32)]["qps"],
                      ">=", 3))
    print(target_line(f"retrieval_qps_vs_ceiling_c{top}", results[("ours", top)]["qps"] / ceiling_qps, ">=", 0.85))


if __name__ == "__main__":
    main()
