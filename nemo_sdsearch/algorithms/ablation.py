"""The three-way ablation: GRPO, SD-Search and Search-E1 at equal rollout budget, several seeds each.

    sdsearch ablate [--seeds 0 1 2] [--out runs/ablation] [--results docs/results.md] [key=value ...]

The budget is Search-E1's: `search_e1.cycles x (grpo_steps x B x G + pool_questions x pool_samples)` rollouts
(its GRPO rounds plus its rollout pools; the OPSD rounds train on pool rollouts and sample none).
GRPO and SD-Search get `round(budget / (B x G))` steps of B x G rollouts. Dev evaluations are not
counted (all three spend the same on them). Every run lives in `OUT/<algorithm>/seed_<s>`. A new
ablation needs an empty OUT (or `trainer.overwrite=true`); with `trainer.resume=true` a killed ablation
continues where it stopped: finished runs (their `result.json` exists) are kept, interrupted ones resumed.

Every run's final model (and the warm start) is evaluated greedily on the test questions; its result.json
(OUT/start.json) keeps the per-kind scores and every question's outcome (id -> EM, first-query hit). At the
end the results file gets, per method, test EM and first-query hit as mean over seeds with a 95% Student-t
interval (the warm start: its value with a binomial interval), test EM per question kind, a paired comparison
of SD-Search and Search-E1 against GRPO (seed-paired and question-paired, `paired_comparisons`), the command,
machine and wall time, and a PNG of dev EM and dev first-query hit against rollouts consumed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

from nemo_sdsearch.core.files import atomic_write_text

ALGORITHMS = ("grpo", "sd_search", "search_e1")   # the default arms: the three methods as configured
# Every arm: (algorithm, its config overrides on top of the study's config). A run's result.json keeps the arm's
# name under "algorithm" (a method arm's name is its algorithm's).
ARMS = {
    "grpo": ("grpo", ()),
    "sd_search": ("sd_search", ()),
    "sd_placebo": ("sd_search", ("sd.hindsight_source=other_question",)),   # another question's block
    "sd_others": ("sd_search", ("sd.hindsight_members=others",)),           # the rollout's own attempt left out
    "search_e1": ("search_e1", ()),
}
LABELS = {"grpo": "GRPO", "sd_search": "SD-Search", "search_e1": "Search-E1", "start": "warm start",
          "sd_placebo": "SD-Search, placebo block", "sd_others": "SD-Search, others' attempts"}
KINDS = ("all", "single_hop", "bridge", "comparison")
METRICS = {"em": "EM", "first_query_hit": "first-query hit"}  # the compared test metrics (per question: 0/1)
Z95 = 1.959963984540054  # the normal 0.975 quantile
# Student t 0.975 quantiles for 1..30 degrees of freedom (used when scipy is not installed)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def rollout_budget(cfg) -> tuple[int, int]:
    """(Search-E1's rollouts, the GRPO / SD-Search step count that matches them)."""
    e1, per_step = cfg.search_e1, cfg.trainer.questions_per_step * cfg.rollout.group_size
    budget = e1.cycles * (e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples)
    return budget, max(1, round(budget / per_step))


# ---------------------------------------------------------------------------------------------------
# Evaluation with per-question outcomes
# ---------------------------------------------------------------------------------------------------
def question_outcomes(predictions: list[dict]) -> dict[str, dict]:
    """question id -> {"kind", "em" and, when the question records evidence passages, "first_query_hit"}
    (0.0 / 1.0), from an `eval.harness.EvalReport`'s predictions of one dataset."""
    out = {}
    for p in predictions:
        row = {"kind": p["kind"], "em": float(p["em"])}
        if "first_query_hit" in p:
            row["first_query_hit"] = float(p["first_query_hit"])
        out[str(p["id"])] = row
    return out


def greedy_eval(engine, questions, batch_size: int) -> tuple[dict, dict]:
    """(per-kind scores as `setup.greedy_em` gives them, per-question outcomes `question_outcomes`)."""
    from nemo_sdsearch.eval.harness import evaluate

    report = evaluate(engine, {"x": questions}, batch_size=batch_size, progress=False)
    return report.by_dataset["x"], question_outcomes(report.predictions["x"])


def _test_eval(cfg, model_dir: str) -> tuple[dict, dict]:
    from nemo_sdsearch.algorithms.setup import build_components, close_components

    c = build_components(replace(cfg, model=replace(cfg.model, path=model_dir)), with_reference=False)
    try:
        return greedy_eval(c.engines["test"], c.data["test"], cfg.trainer.eval_batch_size)
    finally:
        close_components(c)


def arm_config(cfg, arm: str):
    """The study's config as arm `arm` runs it (its algorithm and overrides)."""
    from nemo_sdsearch.config import apply_overrides

    if arm not in ARMS:
        raise ValueError(f"unknown ablation arm {arm!r}: choose from {', '.join(ARMS)}")
    algorithm, overrides = ARMS[arm]
    return apply_overrides(replace(cfg, algorithm=algorithm), list(overrides))


def run_one(cfg, algorithm: str, seed: int, out: Path, console) -> dict:
    """Arm `algorithm` (a key of ARMS) with `seed`: train, evaluate on the test questions, keep result.json."""
    from nemo_sdsearch.algorithms import grpo, search_e1

    arm = algorithm
    algorithm = ARMS[arm][0] if arm in ARMS else arm
    run_dir = out / arm / f"seed_{seed}"
    done = run_dir / "result.json"
    if done.exists():
        console.print(f"[dim]{arm} seed {seed}: done earlier, kept ({done})[/dim]")
        result = json.loads(done.read_text())
        state_file = run_dir / "search_e1_state.json"
        if algorithm == "search_e1" and state_file.exists():  # the curve as this version draws it
            result["curve"] = search_e1_curve(cfg, json.loads(state_file.read_text())["rounds"], run_dir)
        return result
    budget, steps = rollout_budget(cfg)
    per_step = cfg.trainer.questions_per_step * cfg.rollout.group_size
    acfg = arm_config(cfg, arm)
    rcfg = replace(acfg,
                   trainer=replace(acfg.trainer, seed=seed, out_dir=str(run_dir), overwrite=False,
                                   final_test_eval=False,
                                   steps=steps if algorithm != "search_e1" else cfg.trainer.steps))
    console.rule(f"ablation: {LABELS.get(arm, arm)}, seed {seed}")
    t0 = time.perf_counter()
    curve = []  # [rollouts consumed, dev EM, dev first-query hit or None]
    if algorithm == "search_e1":
        state = search_e1.run(rcfg, console, progress=False)
        model_dir = state["final_model"]
        curve = search_e1_curve(cfg, state["rounds"], run_dir)
    else:
        summary = grpo.train(rcfg, console, progress=False)
        model_dir = str(run_dir / "final")
        curve = [[e["step"] * per_step, e["val/dev_em"], e.get("val/dev_first_query_hit")]
                 for e in summary["evals"] if "val/dev_em" in e]
    # every method's final model is evaluated here the same way, with per-question outcomes (the runs
    # themselves skip their final test evaluation: trainer.final_test_eval=false above)
    test, questions = _test_eval(rcfg, model_dir)
    result = {"algorithm": arm, "seed": seed, "rollouts": budget if algorithm == "search_e1" else steps * per_step,
              "test": test, "questions": questions, "curve": curve, "seconds": time.perf_counter() - t0,
              "model": model_dir}
    atomic_write_text(done, json.dumps(result, indent=1))  # whole or absent: a run is done or run again
    return result


def search_e1_curve(cfg, rounds: list[dict], run_dir: Path) -> list[list]:
    """[rollouts consumed, dev EM, dev first-query hit] of a Search-E1 run's rounds: a GRPO round's last dev
    evaluation at the step it measured (`dev_step`; older state files: read from the round's summary.json,
    else the round's end); an OPSD round (which samples nothing: its pool came before it) at the rollouts
    consumed up to its pool, first its start (`dev_em_before`, the GRPO round's end weights, where recorded),
    then the adapter it kept, so a vertical step is what the OPSD round itself changed."""
    e1, per_step = cfg.search_e1, cfg.trainer.questions_per_step * cfg.rollout.group_size
    round_rollouts = e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples
    curve = []
    for rd in rounds:
        start = rd["cycle"] * round_rollouts
        if rd["stage"] == "grpo":
            step = rd.get("dev_step")
            summary = run_dir / f"cycle_{rd['cycle']}" / "grpo" / "summary.json"
            if step is None and summary.exists():
                evals = [e for e in json.loads(summary.read_text()).get("evals", []) if "val/dev_em" in e]
                step = evals[-1]["step"] if evals else None
            points = [(start + (e1.grpo_steps if step is None else step) * per_step, rd["dev_em"],
                       rd.get("dev_first_query_hit"))]
        else:
            points = [(start + round_rollouts, rd.get("dev_em_before"), rd.get("dev_first_query_hit_before")),
                      (start + round_rollouts, rd["dev_em"], rd.get("dev_first_query_hit"))]
        curve += [list(p) for p in points if p[1] is not None]
    return curve


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------
def t_quantile(df: int) -> float:
    """The Student t 0.975 quantile with `df` degrees of freedom (scipy when installed, else `T975`; beyond
    30 degrees of freedom without scipy, the 30 one: slightly conservative)."""
    try:
        from scipy.stats import t
    except ImportError:
        return T975[min(df, len(T975)) - 1]
    return float(t.ppf(0.975, df))


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half width of the 95% interval mean ± t_{0.975,k-1} sd / sqrt(k)) of k values (sd with k - 1);
    the half width is NaN for fewer than 2 values."""
    k = len(values)
    if k == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if k < 2:
        return mean, math.nan
    return mean, t_quantile(k - 1) * statistics.stdev(values) / math.sqrt(k)


def binomial_interval(p: float, n: int) -> float:
    """Half width of the normal-approximation 95% interval of a proportion p over n trials: 1.96 sqrt(p(1-p)/n)."""
    return Z95 * math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (scipy when installed, else the regularized
    incomplete beta function: P(T > t) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t >= 0)."""
    try:
        from scipy.stats import t as student
    except ImportError:
        tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
        return tail if t >= 0 else 1.0 - tail
    return float(student.sf(t, df))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Lentz's continued fraction, Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down; reject where adjusted <= alpha controls the family-wise error)."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def one_sided_tests(results: list[dict], metric: str = "first_query_hit", alpha: float = 0.05) -> list[dict]:
    """The pre-registered family: for each contrast (`contrasts_of`), the seed-paired differences on `metric`,
    a one-sided paired t test of "method > base" (t = mean / (sd / sqrt(k)), k - 1 degrees of freedom), the
    p-values Holm-adjusted over the family, and whether each is rejected at `alpha`."""
    rows = []
    for method, base in contrasts_of(results):
        c = seed_paired([r for r in results if r["algorithm"] == method],
                        [r for r in results if r["algorithm"] == base], metric)
        diffs = list(c["diffs"].values())
        if len(diffs) < 2:
            continue
        sd = statistics.stdev(diffs)
        mean = statistics.fmean(diffs)
        if sd == 0:
            t, p = (math.inf, 0.0) if mean > 0 else (-math.inf if mean < 0 else 0.0, 1.0)
        else:
            t = mean / (sd / math.sqrt(len(diffs)))
            p = t_sf(t, len(diffs) - 1)
        rows.append({"method": method, "base": base, "metric": metric, "n": len(diffs), "mean": mean, "sd": sd,
                     "t": t, "p": p})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"], row["reject"] = adj, adj <= alpha
    return rows


def _excludes_zero(mean: float, half: float) -> bool:
    return half == half and (mean - half > 0 or mean + half < 0)


def _run_value(r: dict, metric: str) -> float | None:
    return r["test"].get("all", {}).get(metric)


def seed_paired(method: list[dict], base: list[dict], metric: str) -> dict:
    """Difference of the per-seed test means (method - base) of the runs with the same seed: mean and 95% t
    interval over those seeds. Seeds where either run lacks the metric are left out."""
    b = {r["seed"]: _run_value(r, metric) for r in base}
    diffs = {r["seed"]: _run_value(r, metric) - b[r["seed"]] for r in method
             if _run_value(r, metric) is not None and b.get(r["seed"]) is not None}
    mean, half = t_interval(list(diffs.values()))
    return {"pairing": "seeds", "n": len(diffs), "seeds": sorted(diffs), "mean": mean, "half": half,
            "excludes_zero": _excludes_zero(mean, half), "better": sum(d > 0 for d in diffs.values()),
            "worse": sum(d < 0 for d in diffs.values()), "diffs": diffs}


def question_paired(method: list[dict], base: list[dict], metric: str) -> dict:
    """Per test question, the mean over the shared seeds of (method - base) outcome (0/1 each); the mean of
    those differences over the questions with a 95% interval of 1.96 standard errors (sd over questions /
    sqrt(n), normal approximation), and how many questions the method does better / worse / the same on.
    Shared seeds: both runs of the seed keep per-question outcomes; questions: those every one of those runs
    has the metric for (first-query hit: the questions recording evidence passages)."""
    b = {r["seed"]: r for r in base if r.get("questions")}
    pairs = [(r["questions"], b[r["seed"]]["questions"]) for r in sorted(method, key=lambda r: r["seed"])
             if r.get("questions") and r["seed"] in b]
    seeds = sorted(r["seed"] for r in method if r.get("questions") and r["seed"] in b)
    ids = None
    for m, g in pairs:
        have = {q for q in m if metric in m[q]} & {q for q in g if metric in g[q]}
        ids = have if ids is None else ids & have
    ids = sorted(ids or ())
    diffs = [statistics.fmean(m[q][metric] - g[q][metric] for m, g in pairs) for q in ids]
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    eps = 1e-12
    return {"pairing": "questions", "n": len(diffs), "seeds": seeds, "mean": mean, "half": half,
            "excludes_zero": _excludes_zero(mean, half), "better": sum(d > eps for d in diffs),
            "worse": sum(d < -eps for d in diffs), "same": sum(abs(d) <= eps for d in diffs)}


def arms_of(results: list[dict]) -> list[str]:
    """The arms `results` holds, in ARMS order (then any other name, sorted)."""
    have = {r["algorithm"] for r in results}
    return [a for a in ARMS if a in have] + sorted(have - set(ARMS))


def contrasts_of(results: list[dict]) -> list[tuple[str, str]]:
    """(method, base) pairs compared: every arm against GRPO, and SD-Search against its placebo (the
    contrast that separates reading this question's outcomes from a block of text being present)."""
    arms = arms_of(results)
    out = [(a, "grpo") for a in arms if a != "grpo" and "grpo" in arms]
    if "sd_search" in arms and "sd_placebo" in arms:
        out.append(("sd_search", "sd_placebo"))
    return out


def paired_comparisons(results: list[dict], base: str | None = None) -> list[dict]:
    """Seed-paired and question-paired differences of each contrast (`contrasts_of`; with `base`: every arm
    against `base` only), for each metric in `METRICS` (comparisons with nothing to pair are left out)."""
    pairs = contrasts_of(results) if base is None else [(a, base) for a in arms_of(results) if a != base]
    out = []
    for alg, base_arm in pairs:
        runs = [r for r in results if r["algorithm"] == alg]
        base_runs = [r for r in results if r["algorithm"] == base_arm]
        if not runs or not base_runs:
            continue
        for metric in METRICS:
            for fn in (seed_paired, question_paired):
                c = fn(runs, base_runs, metric)
                if c["n"]:
                    out.append({"method": alg, "base": base_arm, "metric": metric, **c})
    return out


# ---------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------
def _pm(mean: float | None, half: float) -> str:
    if mean is None or mean != mean:
        return "n/a"
    return f"{mean:.3f} ± {half:.3f}" if half == half else f"{mean:.3f} (one seed: no CI)"


def _seed_cell(rs: list[dict], metric: str, kind: str = "all") -> str:
    vals = [r["test"][kind][metric] for r in rs if metric in r["test"].get(kind, {})]
    return _pm(*t_interval(vals)) if vals else "n/a"


def _start_cell(start: dict, metric: str) -> str:
    a = start.get("all", {})
    if metric not in a:
        return "n/a"
    n = a["n_evidence"] if metric == "first_query_hit" else a["n"]
    return _pm(a[metric], binomial_interval(a[metric], n))


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _ci(c: dict) -> str:
    if c["half"] != c["half"]:
        return f"{_signed(c['mean'])} (no CI: {c['n']} pair{'s' if c['n'] != 1 else ''})"
    return f"{_signed(c['mean'])} [{_signed(c['mean'] - c['half'])}, {_signed(c['mean'] + c['half'])}]"


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


EM_DEFINITIONS = {
    "squad": "EM uses the SQuAD / Search-R1 answer normalisation (lower case, ASCII punctuation and a/an/the "
             "removed, whitespace collapsed), as the papers' tables do.",
    "unicode": "EM uses the lenient Unicode normalisation (reward.normalization=unicode: NFKC, all Unicode "
               "punctuation removed); not comparable with the papers' tables.",
}
FIRST_QUERY_HIT = ("First-query hit: the fraction of test questions whose first search retrieved the evidence "
                   "passage of a hop that can be searched first (the first hop; either hop of a comparison); a "
                   "rollout that never searched misses (`world/evidence.py`).")


def paired_markdown(results: list[dict]) -> list[str]:
    """The `## Paired comparison against GRPO` section: the table, the comparisons whose 95% interval
    excludes 0 (in words), and the runs left out."""
    comps = paired_comparisons(results)
    lines = ["## Paired comparison against GRPO", "",
             "Difference = method − base on the test questions (positive: the method is better than its base; the "
             "base is GRPO, and for SD-Search also its placebo arm when the study has one).",
             "- Seed-paired: per seed, the method's test mean minus the base's with the same seed; the mean over "
             "seeds ± t_{0.975,k−1}·sd/√k (k seeds). Its interval reflects the training randomness.",
             "- Question-paired: per test question, the mean over the seeds of (method − base) outcome (0/1 "
             "each); the mean over the n questions ± 1.96·sd/√n (normal approximation), and the number of "
             "questions the method does better / worse / the same on. Its interval reflects which test "
             "questions were drawn, for these trained models (not the seed-to-seed spread).",
             ""]
    if not comps:
        return lines + ["No comparison: GRPO or the other methods have no runs to pair.", ""]
    lines += ["| comparison | metric | pairing | pairs | difference [95% CI] | CI excludes 0 | better / worse / same |",
              "|---|---|---|---:|---|---|---|"]
    for c in comps:
        name = f"{LABELS[c['method']]} − {LABELS[c['base']]}"
        if c["pairing"] == "seeds":
            pairing, counts = f"seeds {_seeds(c['seeds'])}", f"{c['better']} / {c['worse']} / {c['n'] - c['better'] - c['worse']} seeds"
        else:
            pairing, counts = f"questions (seeds {_seeds(c['seeds'])})", f"{c['better']} / {c['worse']} / {c['same']} questions"
        excl = "n/a" if c["half"] != c["half"] else ("**yes**" if c["excludes_zero"] else "no")
        lines.append(f"| {name} | {METRICS[c['metric']]} | {pairing} | {c['n']} | {_ci(c)} | {excl} | {counts} |")
    lines.append("")
    hits = [c for c in comps if c["excludes_zero"]]
    if hits:
        lines.append("Comparisons whose 95% CI excludes 0:")
        for c in hits:
            side = "better" if c["mean"] > 0 else "worse"
            lines.append(f"- {LABELS[c['method']]} vs {LABELS[c['base']]}, {METRICS[c['metric']]}, "
                         f"{c['pairing'][:-1]}-paired: {_ci(c)}: {LABELS[c['method']]} is {side} than "
                         f"{LABELS[c['base']]}.")
        rest = len(comps) - len(hits)
        if rest:
            lines.append(f"- The other {rest} comparison{'s' if rest != 1 else ''} include{'s' if rest == 1 else ''} 0: "
                         "no difference from GRPO shown there.")
    else:
        lines.append("No comparison's 95% CI excludes 0: no method is distinguishable from its base on test EM "
                     "or first-query hit in this run.")
    lines.append("")
    missing = [r for r in results if not r.get("questions")]
    if missing:
        lines.append("Left out of the question-paired comparison (an older result.json without per-question "
                     "outcomes): " + ", ".join(f"{LABELS[r['algorithm']]} seed {r['seed']}" for r in missing)
                     + "; a seed is paired only where both runs keep them.")
        lines.append("")
    return lines


def tests_markdown(results: list[dict]) -> list[str]:
    """The `## Pre-registered tests` section: one-sided seed-paired t tests of each contrast, Holm-adjusted
    within the primary (first-query hit) and the secondary (EM) family."""
    lines = ["## Pre-registered tests", "",
             "One-sided paired t tests of \"method > base\" over the seeds (t = mean / (sd / √k), k − 1 degrees "
             "of freedom); p-values Holm-adjusted within each family; rejected where the adjusted p ≤ 0.05.", ""]
    for metric, family in (("first_query_hit", "primary"), ("em", "secondary")):
        rows = one_sided_tests(results, metric)
        if not rows:
            continue
        lines += [f"{family.capitalize()} endpoint, test {METRICS[metric]}:", "",
                  "| contrast | seeds | mean difference | sd | t | p (one-sided) | p (Holm) | rejected |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {LABELS.get(r['method'], r['method'])} − {LABELS.get(r['base'], r['base'])} | {r['n']} | "
                         f"{_signed(r['mean'])} | {r['sd']:.3f} | {r['t']:.2f} | {r['p']:.4f} | {r['p_holm']:.4f} | "
                         f"{'**yes**' if r['reject'] else 'no'} |")
        lines.append("")
    return lines if len(lines) > 4 else []


def results_markdown(start: dict, results: list[dict], budget: int, command: str, machine: str,
                     analysis: str = "", normalization: str = "squad", wall_s: float | None = None,
                     invocations: int = 1, preregistration: str = "") -> str:
    """The results file. `start`: the warm start's test scores per kind; `wall_s`: the wall time of the
    `invocations` that produced the runs (an invocation reuses the runs earlier ones finished)."""
    seeds = sorted({r["seed"] for r in results})
    total_min = sum(r["seconds"] for r in results) / 60
    wall = "" if wall_s is None else f"{wall_s / 60:.1f} min wall time"
    if wall and invocations > 1:
        wall += f" over {invocations} invocations (each reuses the runs the earlier ones finished)"
    n_test = start.get("all", {}).get("n")
    lines = [
        "# Ablation: GRPO vs SD-Search vs Search-E1 on the tiny world",
        "",
        *([preregistration.rstrip(), ""] if preregistration else []),
        "## Results",   # ends the pre-registration: a rewrite keeps that section, never this block
        "",
        f"Written by `{command}` on {machine}: {len(results)} runs, {total_min:.1f} min of training in all"
        + (f", {wall}." if wall else "."),
        f"Seeds {seeds}; equal rollout budget of about {budget} training rollouts per run; test metrics are greedy,",
        f"on {'the ' + str(n_test) + ' questions of ' if n_test else ''}the bundled test world (a different world "
        "from training), BM25 top-3.",
        EM_DEFINITIONS[normalization],
        FIRST_QUERY_HIT,
        "95% confidence intervals: a method over k seeds shows mean ± t_{0.975,k−1}·sd/√k over its seeds "
        "(Student t); the warm start (one model) shows its value ± 1.96·√(p(1−p)/n) over the n test questions "
        "(binomial, normal approximation).",
        "",
        "| method | runs | test EM (95% CI) | test first-query hit (95% CI) | minutes per run |",
        "|---|---:|---|---|---:|",
        f"| {LABELS['start']} | 1 | {_start_cell(start, 'em')} | {_start_cell(start, 'first_query_hit')} | |",
    ]
    for alg in arms_of(results):
        rs = [r for r in results if r["algorithm"] == alg]
        if not rs:
            continue
        minutes = statistics.mean(r["seconds"] for r in rs) / 60
        lines.append(f"| {LABELS[alg]} | {len(rs)} | {_seed_cell(rs, 'em')} | {_seed_cell(rs, 'first_query_hit')} "
                     f"| {minutes:.1f} |")
    lines += ["", "Test EM per question kind (methods: mean ± 95% t CI over seeds; warm start: its value):", "",
              "| method | " + " | ".join(KINDS) + " |",
              "|---|" + "---|" * len(KINDS),
              f"| {LABELS['start']} | " + " | ".join(f"{start[k]['em']:.3f}" if k in start else "n/a" for k in KINDS)
              + " |"]
    for alg in arms_of(results):
        rs = [r for r in results if r["algorithm"] == alg]
        if rs:
            lines.append(f"| {LABELS[alg]} | " + " | ".join(_seed_cell(rs, "em", k) for k in KINDS) + " |")
    lines += [""] + paired_markdown(results) + tests_markdown(results)
    lines += ["Per run (test, all questions):", ""]
    for r in results:
        fqh = _run_value(r, "first_query_hit")
        lines.append(f"- {LABELS[r['algorithm']]} seed {r['seed']}: EM {r['test']['all']['em']:.3f}"
                     + (f", first-query hit {fqh:.3f}" if fqh is not None else "")
                     + f" ({r['rollouts']} rollouts, {r['seconds'] / 60:.1f} min)")
    lines += ["", "![dev EM and dev first-query hit against rollouts](results_curves.png)", "",
              "Left: greedy dev EM; right: greedy dev first-query hit; against the training rollouts a run had "
              "consumed (one line per run; the first point is the warm start). Search-E1's points are its rounds: "
              "the last dev evaluation of each GRPO round (at the step it was taken) and, for each OPSD round, its start "
              "and the adapter it kept (one above the other: a vertical step is the OPSD round's own change)."]
    no_fqh = [r for r in results if r["curve"] and all(len(p) < 3 or p[2] is None for p in r["curve"])]
    if no_fqh:
        lines.append("Without dev first-query hit (not recorded by that run), so in the left panel only: "
                     + ", ".join(f"{LABELS[r['algorithm']]} seed {r['seed']}" for r in no_fqh) + ".")
    lines.append("")
    if analysis:
        lines += [analysis.rstrip(), ""]
    return "\n".join(lines)


def kept_analysis(path: Path) -> str:
    """The hand-written `## Analysis` section of an existing results file (kept across re-runs): from a line that
    is exactly `## Analysis` to the end (a `### Analysis` of the pre-registration, the analysis plan, is not it)."""
    if not path.exists():
        return ""
    text = path.read_text()
    m = re.search(r"^## Analysis[ \t]*$", text, re.M)
    return text[m.start():] if m else ""


def kept_preregistration(path: Path) -> str:
    """The `## Pre-registration` section of an existing results file (up to the next `## ` header), kept
    verbatim above the results: it was written and committed before the study ran."""
    if not path.exists():
        return ""
    text = path.read_text()
    i = text.find("## Pre-registration")
    if i < 0:
        return ""
    j = text.find("\n## ", i + 1)
    return text[i:j + 1] if j >= 0 else text[i:]


def plot_curves(results: list[dict], start_dev: float | None, path: Path,
                start_dev_fqh: float | None = None) -> None:
    """Two panels against training rollouts consumed: dev EM and dev first-query hit (runs that recorded it),
    one line per run, the warm start's dev value as the first point."""
    from nemo_sdsearch.algorithms.report import figure

    with figure(path, 2, (11, 4), "training rollouts") as axes:
        for col, (ax, start, ylabel) in enumerate(zip(axes, (start_dev, start_dev_fqh),
                                                      ("dev EM (greedy)", "dev first-query hit (greedy)"))):
            for i, alg in enumerate(ARMS):
                labelled = False
                for r in (r for r in results if r["algorithm"] == alg):
                    pts = [(p[0], p[1 + col]) for p in r["curve"] if len(p) > 1 + col and p[1 + col] is not None]
                    if not pts:
                        continue
                    pts = ([(0, start)] if start is not None else []) + pts
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.8, marker=".",
                            label=None if labelled else LABELS[alg])
                    labelled = True
            ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()


def describe_machine(cfg) -> str:
    """The machine the runs trained on, in words: the GPU when the model runs on one, else the CPU."""
    import os
    import platform

    import torch

    threads = f"{cfg.model.threads} thread{'s' if cfg.model.threads != 1 else ''}"
    device = cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} GPU ({platform.machine()}, {threads})"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores), {threads}"


def run_ablation(cfg, seeds: list[int], out: Path, results_path: Path, command: str, console=None,
                 algorithms=ALGORITHMS) -> dict:
    from rich.console import Console
    from rich.table import Table

    from nemo_sdsearch.algorithms.setup import build_components, close_components, greedy_em
    from nemo_sdsearch.algorithms.state import check_out_dir, clear_out_dir
    from nemo_sdsearch.world.assets import default_model_dir

    console = console or Console()
    for arm in algorithms:   # every arm's config is valid before anything runs
        arm_config(cfg, arm)
    check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)
    clear_out_dir(out, cfg.trainer.overwrite)
    t0 = time.perf_counter()
    budget, steps = rollout_budget(cfg)
    console.print(f"rollout budget {budget} per run: GRPO / SD-Search {steps} steps; "
                  f"Search-E1 {cfg.search_e1.cycles} cycles of {cfg.search_e1.grpo_steps} GRPO steps + pools")
    start_file = out / "start.json"
    if start_file.exists():  # an older start.json may lack "questions" and "dev_first_query_hit"
        start = json.loads(start_file.read_text())
    else:
        start_cfg = replace(cfg, model=replace(cfg.model, path=cfg.model.path or str(default_model_dir())))
        c = build_components(start_cfg, with_reference=False)
        test, questions = greedy_eval(c.engines["test"], c.data["test"], cfg.trainer.eval_batch_size)
        dev = greedy_em(c.engines["dev"], c.data["dev"], cfg.trainer.eval_batch_size)["all"]
        close_components(c)
        start = {"test": test, "questions": questions, "dev": dev["em"],
                 "dev_first_query_hit": dev.get("first_query_hit")}
        atomic_write_text(start_file, json.dumps(start, indent=1))
    # Seed-major order: an ablation stopped early (and re-run with fewer --seeds) has whole seeds.
    results = [run_one(cfg, alg, s, out, console) for s in seeds for alg in algorithms]
    wall = time.perf_counter() - t0
    # the wall time of every invocation that worked on these runs, kept next to them
    wall_file = out / "wall_time.json"
    spent = json.loads(wall_file.read_text()) if wall_file.exists() else {"seconds": 0.0, "invocations": 0}
    spent = {"seconds": spent["seconds"] + wall, "invocations": spent["invocations"] + 1}
    atomic_write_text(wall_file, json.dumps(spent))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, start["dev"], results_path.parent / "results_curves.png", start.get("dev_first_query_hit"))
    atomic_write_text(results_path, results_markdown(
        start["test"], results, budget, command, describe_machine(cfg), kept_analysis(results_path),
        cfg.reward.normalization, spent["seconds"], spent["invocations"], kept_preregistration(results_path)))
    table = Table(title="test metrics (methods: mean ± 95% t CI over seeds; warm start: ± binomial 95% CI)")
    for col in ("method", "runs", "EM", "first-query hit"):
        table.add_column(col)
    table.add_row(LABELS["start"], "1", _start_cell(start["test"], "em"), _start_cell(start["test"], "first_query_hit"))
    for alg in algorithms:
        rs = [r for r in results if r["algorithm"] == alg]
        table.add_row(LABELS.get(alg, alg), str(len(rs)), _seed_cell(rs, "em"), _seed_cell(rs, "first_query_hit"))
    console.print(table)
    for c in paired_comparisons(results):
        console.print(f"{LABELS[c['method']]} − {LABELS[c['base']]}, {METRICS[c['metric']]}, {c['pairing'][:-1]}-paired "
                      f"(n={c['n']}): {_ci(c)}{'  CI excludes 0' if c['excludes_zero'] else ''}")
    for r in one_sided_tests(results):
        console.print(f"one-sided test {LABELS[r['method']]} > {LABELS[r['base']]} (first-query hit, {r['n']} seeds): "
                      f"p {r['p']:.4f}, Holm {r['p_holm']:.4f}{'  rejected' if r['reject'] else ''}")
    console.print(f"wrote {results_path} and {results_path.parent / 'results_curves.png'} ({wall / 60:.1f} min)")
    return {"start": start, "results": results, "wall_s": wall}
