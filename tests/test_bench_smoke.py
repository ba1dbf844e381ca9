"""Every bench in bench/ runs in its smoke mode (`--smoke`: seconds, tiny sizes) and prints its TARGET lines, so a bench
cannot break unseen (`python -m pytest -q -k bench`). A smoke run checks that the bench works, not what it measures:
the full runs measure (their numbers are in the docs and the issue notes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# bench -> the TARGET names its smoke run prints (the full run prints the same)
TARGETS = {
    "index_build": ["index_builds_complete", "bm25_build_passages_per_s", "dense_build_peak_rss_mib"],
    "learning": None,            # its gains, one line per measure (core/targets.py)
    "losses": ["jsd_extra_memory_vs_dense", "jsd_time_vs_dense", "jsd_time_vs_floor"],
    "retrieval": ["retrieval_latency_ratio_c1", "retrieval_qps_ratio_c32", "retrieval_qps_vs_ceiling_c64"],
    "rollout": ["rollout_speedup", "rollout_speedup_training_shaped", "rollout_vs_decode_ceiling_training_shaped",
                "rollout_vs_length_matched_ceiling_training_shaped"],
    "rollout_pool": ["pools_same_trajectories", "smallest_pool_kv_peak_over_unbounded"],
    "scaling": None,
}
HELPERS = {"search_r1_style_server"}   # not a bench: the peer server bench/retrieval.py starts
ELSEWHERE = {"step": "tests/test_bench_step.py", "pp_teacher": "tests/test_pp_teacher.py",
             "teacher_signal": "tests/test_teacher_signal.py"}


def test_bench_every_script_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts == set(TARGETS) | HELPERS | set(ELSEWHERE)
    for name in set(TARGETS) | set(ELSEWHERE):
        assert "--smoke" in (BENCH / f"{name}.py").read_text(), name


# the longest first: two at a time, the pair that finishes last should not start last
ORDER = ["scaling", "learning", "retrieval", "rollout", "rollout_pool", "losses", "index_build"]


@pytest.fixture(scope="module")
def smoke_runs(request):
    """The smoke runs of the benches this session selected, two at a time, each on one thread (the two cores):
    name -> CompletedProcess."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = {item.callspec.params["name"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_bench_smoke"}
    names = [n for n in ORDER if n in wanted] + sorted(wanted - set(ORDER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = lambda name: subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"], capture_output=True,
                                      text=True, timeout=900, env=env)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(run, names)))


def test_bench_smoke_order_names_every_bench():
    assert sorted(ORDER) == sorted(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bench_smoke(name, smoke_runs):
    p = smoke_runs[name]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = re.findall(r"^TARGET (\S+) value=\S+ goal=(?:>=|<=)\S+ met=(?:yes|no)$", p.stdout, re.M)
    assert lines, p.stdout[-3000:]
    if TARGETS[name]:
        assert lines == TARGETS[name]
