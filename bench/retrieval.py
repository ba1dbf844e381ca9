"""Retrieval service throughput: our server (async, dynamic batching) against a Search-R1-style server
(synchronous endpoint, one encode per request), same encoder (bundled MiniLM), same FAISS flat index
and corpus, side by side in one run on loopback, at concurrency 1, 8 and 32.

    python bench/retrieval.py [--requests 600] [--corpus FILE]
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
from nemo_sdsearch.eval.targets import target_line  # noqa: E402

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


async def load(url: str, queries: list[str], concurrency: int, n: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat, errors = [], 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/retrieve", json={"queries": [queries[i % len(queries)]], "topk": 3,
                                                             "return_scores": True})
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(min(concurrency * 4, n))))  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"qps": n / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), "errors": errors}


def main():
    from nemo_sdsearch.world.generator import build_bundle
    from retrieval.build import build_index

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--corpus", help="corpus jsonl (default: the bundled test world)")
    args = ap.parse_args()
    bundle = build_bundle()
    queries = [h.query for q in bundle.test for h in q.hops]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus.jsonl"
        if not args.corpus:
            corpus.write_text("".join(json.dumps(p) + "\n" for p in bundle.test_world.passages))
        index = Path(tmp) / "index"
        build_index(corpus, index, kind="dense", progress=False)
        results = {}
        for name, script in (("ours", ["-m", "retrieval", "serve"]),
                             ("search_r1_style", [str(HERE / "search_r1_style_server.py")])):
            port = free_port()
            proc = start([sys.executable, *script, "--index", str(index), "--port", str(port)], port)
            try:
                for c in (1, 8, 32):
                    n = args.requests if c > 1 else max(100, args.requests // 4)
                    results[(name, c)] = asyncio.run(load(f"http://127.0.0.1:{port}", queries, c, n))
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"dense retrieval (bundled MiniLM + FAISS flat), one query per request, topk 3, {os.cpu_count()} cores")
    print(f"{'concurrency':>11s} | {'ours QPS':>9s} {'p50 ms':>7s} {'p99 ms':>7s} | {'S-R1 QPS':>9s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s} | {'QPS ratio':>9s}")
    for c in (1, 8, 32):
        o, b = results[("ours", c)], results[("search_r1_style", c)]
        print(f"{c:11d} | {o['qps']:9.1f} {o['p50_ms']:7.1f} {o['p99_ms']:7.1f} | {b['qps']:9.1f} {b['p50_ms']:7.1f} "
              f"{b['p99_ms']:7.1f} | {o['qps'] / b['qps']:9.2f}")
    print("errors per run: " + ", ".join(f"{n} c={c}: {r['errors']}" for (n, c), r in results.items()))
    print(target_line("retrieval_qps_ratio_c32", results[("ours", 32)]["qps"] / results[("search_r1_style", 32)]["qps"], ">=", 3))


if __name__ == "__main__":
    main()
