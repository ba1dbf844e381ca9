"""Does the main job visibly learn? `sdsearch train` with its default config (conf/tiny_cpu.yaml: SD-Search
from the embedded warm start on the bundled world) side by side with the untrained warm start, greedy, on
the same test set (the whole test world, 300 questions by default).

    python bench/learning.py [--out DIR] [--keep] [key=value ...]

The run is the README's main job (`train(load_config("tiny_cpu", overrides))`, in this process, with its
own start-of-run and end-of-run test evaluations: the start weights ARE the untrained warm start). Per metric
(test EM; first-query hit rate: the fraction of questions whose first search retrieved the evidence passage
of a hop searchable first) it prints start and end with binomial standard errors sqrt(p(1-p)/n) and the
gain in standard errors, (end - start) / sqrt(se_start^2 + se_end^2): the unpaired figure the end-of-run
table prints (conservative: the two evaluations share their questions). Ends with TARGET lines: each gain
>= 3 standard errors, no-retrieval EM of the warm start <= 0.05 on the same questions (answers need
search), and the job's wall time <= 15 minutes (the README's budget on 2 cores, install not included).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# bench/retrieval.py must not shadow the `retrieval` package
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]


def gain(start: dict, end: dict, rate: str, n_key: str) -> tuple[float, float, float, float, float]:
    """(start, se_start, end, se_end, gain in SE) of one rate of two evaluation records."""
    from nemo_sdsearch.algorithms.report import binomial_se, gain_in_se

    a, b = start[rate], end[rate]
    sa, sb = binomial_se(a, start[n_key]), binomial_se(b, end[n_key])
    return a, sa, b, sb, gain_in_se(a, sa, b, sb)


def no_retrieval_em(cfg) -> float:
    """Greedy EM of the warm start on the same test questions with every search returning nothing."""
    from dataclasses import replace

    from nemo_sdsearch.algorithms.setup import build_components, greedy_em

    c = build_components(cfg, with_reference=False)  # evaluation only: no reference copy
    engine = c.engines["test"]
    engine.cfg = replace(engine.cfg, retrieval=False)
    return greedy_em(engine, c.data["test"], cfg.trainer.eval_batch_size)["all"]["em"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="run directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of conf/tiny_cpu.yaml (default: none)")
    ap.add_argument("--smoke", action="store_true", help="1 step of 2 questions, 8 test questions: the bench runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.overrides = ["trainer.steps=1", "trainer.questions_per_step=2", "rollout.group_size=2",
                          "trainer.eval_every=0", "trainer.save_every=0", "data.test_questions=8",
                          "data.dev_questions=4", "rollout.max_new_tokens=48", *args.overrides]

    from rich.console import Console

    from nemo_sdsearch.algorithms.grpo import train
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.core.targets import target_line

    tmp = None if args.out else Path(tempfile.mkdtemp(prefix="sdsearch_learning_"))
    out = Path(args.out) if args.out else tmp / "run"
    cfg = load_config("tiny_cpu", [*args.overrides, f"trainer.out_dir={out}"])
    if not cfg.trainer.final_test_eval:
        ap.error("trainer.final_test_eval=false: the bench compares the start and end test evaluations")
    console = Console(stderr=True)
    t0 = time.perf_counter()
    summary = train(cfg, console=console, progress=False)
    wall = time.perf_counter() - t0
    start, end = summary["start_test"]["all"], summary["end_test"]["all"]
    no_search = no_retrieval_em(cfg)

    print(f"\nmain job: sdsearch train {' '.join(args.overrides) or '(defaults)'}: {cfg.algorithm}, "
          f"{cfg.trainer.steps} steps x {cfg.trainer.questions_per_step} questions x {cfg.rollout.group_size} "
          f"rollouts, {wall / 60:.1f} min")
    print(f"test set: {start['n']} questions of the test world (a different world seed from training)\n")
    print("| metric | warm start | trained | gain (SE) |\n|---|---:|---:|---:|")
    rows = {}
    for name, rate, n_key in (("test EM", "em", "n"), ("first-query hit", "first_query_hit", "n_evidence")):
        if rate not in start or rate not in end:
            print(f"| {name} | - | - | - |")
            continue
        a, sa, b, sb, z = rows[rate] = gain(start, end, rate, n_key)
        print(f"| {name} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} | {z:+.2f} |")
    print(f"| EM without retrieval (warm start) | {no_search:.3f} | | |\n")
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp)
    elif tmp is not None:
        print(f"kept {out}")
    nan = float("nan")
    print(target_line("test_em_gain_se", rows.get("em", (nan,) * 5)[4], ">=", 3))
    print(target_line("first_query_hit_gain_se", rows.get("first_query_hit", (nan,) * 5)[4], ">=", 3))
    print(target_line("no_retrieval_em", no_search, "<=", 0.05))
    print(target_line("main_job_minutes", wall / 60, "<=", 15))
    met = all(math.isfinite(rows.get(k, (nan,) * 5)[4]) and rows[k][4] >= 3 for k in ("em", "first_query_hit"))
    # the smoke run (1 step) checks that the bench runs, not the gains it cannot have
    return 0 if args.smoke or (met and no_search <= 0.05 and wall <= 15 * 60) else 1


if __name__ == "__main__":
    sys.exit(main())
