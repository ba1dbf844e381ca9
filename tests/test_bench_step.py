"""bench/step.py in its smoke mode: the SD-Search vs GRPO step bench runs end to end on the embedded model and
prints its table and TARGET line (a run of the bench, not a measurement)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step.py"


def test_step_bench_smoke():
    p = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert re.search(r"^4 rollouts \(2 questions x 2\), \d+ policy tokens, \d+ query tokens, 1 threads$", p.stdout, re.M)
    rows = {m.group(1): float(m.group(3)) for m in re.finditer(r"^(GRPO|SD-Search)\s+([\d.]+)\s+([\d.]+)", p.stdout, re.M)}
    assert set(rows) == {"GRPO", "SD-Search"} and all(v > 0 for v in rows.values())
    assert re.search(r"^TARGET sd_step_vs_grpo_step value=[\d.]+ goal=<=1.1 met=(yes|no)$", p.stdout, re.M)
    assert re.search(r"^TARGET fwd_bwd_vs_matmul_ceiling value=[\d.]+ goal=>=0.5 met=(yes|no)$", p.stdout, re.M)
    phases = re.findall(r"^(generation|ref/old log-probs|teacher|forward\+backward|optimizer) ", p.stdout, re.M)
    assert phases == ["generation", "ref/old log-probs", "teacher", "forward+backward", "optimizer"], p.stdout
