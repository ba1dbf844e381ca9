"""Index build cost: wall time and peak memory of `python -m nemo_sdsearch.retrieval build` on a 100,000-passage corpus.

The corpus is one synthetic world of exactly 100,000 entities (one passage each, Search-R1 format), so the
passages look like the bundled world's. Each build runs in its own process; its peak resident memory is
that child's own `ru_maxrss` (from `wait4`), so the numbers cover exactly the build and nothing of this script.

    python bench/index_build.py [--passages 100000] [--kinds dense bm25] [--index flat] [--threads 2]
                                [--workdir DIR] [--json OUT.json]
    python bench/index_build.py --smoke      # 300 passages, both kinds: the bench runs (seconds)

TARGET lines: every build complete, BM25 at least 10,000 passages/s, and the dense build's peak memory at most
2 GiB (bounded by the encoder and one shard, not the corpus; measured: 26,300 passages/s and 994 MiB at 100,000
passages, docs/retrieval.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
HERE = Path(__file__).resolve().parent


def write_corpus(path: Path, n: int, seed: int = 7) -> None:
    from nemo_sdsearch.world.generator import build_world

    # Every entity has 5 passages (3 aspects, 2 fillers): n // 5 entities, 60% persons, 20% organisations,
    # 19% cities, 1% countries; the first n passages are written.
    entities = max(5, -(-n // 5))
    n_countries = max(1, entities // 100)
    n_orgs = entities // 5
    n_persons = (3 * entities) // 5
    n_cities = entities - n_persons - n_orgs - n_countries
    world = build_world(seed, n_persons=n_persons, n_orgs=n_orgs, n_cities=n_cities, n_countries=n_countries)
    assert len(world.passages) >= n, (len(world.passages), n)
    with path.open("w") as f:
        for p in world.passages[:n]:
            f.write(json.dumps(p) + "\n")


def run_build(corpus: Path, out: Path, kind: str, index: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "nemo_sdsearch.retrieval", "build", "--corpus", str(corpus), "--out", str(out), "--kind", kind]
    if kind == "dense":
        cmd += ["--index", index]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()  # the progress bar goes here; read it so the child never blocks on the pipe
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS, its CPU time
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"build {kind} failed ({rc}):\n{stderr[-4000:]}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    meta = json.loads((out / "meta.json").read_text())
    return {"kind": kind, "index": index if kind == "dense" else "bm25s", "passages": meta["num_passages"],
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "index_dir_mib": round(size / 2**20, 1),
            "complete": bool(meta.get("complete"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--kinds", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    ap.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep corpus and indexes here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--smoke", action="store_true", help="300 passages: the bench runs end to end (seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.passages, args.threads = 300, 1

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{args.passages}.jsonl"
    if not corpus.exists():
        write_corpus(corpus, args.passages)
    print(f"corpus: {args.passages} passages, {corpus.stat().st_size / 2**20:.1f} MiB; threads={args.threads}; "
          f"cpus={os.cpu_count()}", flush=True)
    rows = []
    for kind in args.kinds:
        out = work / f"index_{kind}"
        if out.exists():  # measure a build from scratch, not a resume
            shutil.rmtree(out)
        rows.append(run_build(corpus, out, kind, args.index, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| kind | index | passages | wall s | CPU s | peak RSS MiB | index dir MiB | passages/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['index']} | {r['passages']} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['peak_rss_mib']} | {r['index_dir_mib']} | {r['passages'] / r['wall_s']:.0f} |")
    from nemo_sdsearch.core.targets import target_line

    print(target_line("index_builds_complete", float(all(r["complete"] for r in rows)), ">=", 1))
    for r in rows:
        if r["kind"] == "bm25":
            print(target_line("bm25_build_passages_per_s", r["passages"] / max(r["wall_s"], 0.05), ">=", 10_000))
        else:
            print(target_line("dense_build_peak_rss_mib", r["peak_rss_mib"], "<=", 2048))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
