"""The ablation command: equal rollout budgets, per-run results that survive a re-run, the results file, and its
statistics (t and binomial intervals, seed- and question-paired comparisons against GRPO)."""

import json
import math
import sys

import pytest

from nemo_sdsearch.algorithms import ablation
from nemo_sdsearch.algorithms.ablation import ALGORITHMS, rollout_budget, run_ablation
from nemo_sdsearch.config import load_config


def small_config(model_dir, out_dir):
    overrides = {
        "model.path": str(model_dir), "model.threads": 1, "trainer.questions_per_step": 2, "rollout.group_size": 2,
        "rollout.max_new_tokens": 12, "rollout.max_turns": 1, "rollout.max_context": 512, "trainer.eval_every": 1,
        "trainer.save_every": 1, "grpo.micro_batch_size": 2, "data.dev_questions": 3, "data.test_questions": 5,
        "search_e1.cycles": 1, "search_e1.grpo_steps": 1, "search_e1.pool_questions": 2, "search_e1.pool_samples": 2,
        "search_e1.opsd_steps": 1, "search_e1.opsd_eval_every": 1, "trainer.out_dir": str(out_dir),
    }
    return load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])


def test_budget_matches_search_e1():
    cfg = load_config("tiny_cpu")
    budget, steps = rollout_budget(cfg)
    e1, per_step = cfg.search_e1, cfg.trainer.questions_per_step * cfg.rollout.group_size
    assert budget == e1.cycles * (e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples)
    assert abs(steps * per_step - budget) <= per_step / 2


def test_ablation_writes_results_and_reuses_finished_runs(micro_model_dir, tmp_path):
    cfg = small_config(micro_model_dir[0], tmp_path / "unused")
    results = tmp_path / "docs" / "results.md"
    first = run_ablation(cfg, [0, 1], tmp_path / "abl", results, "sdsearch ablate --seeds 0 1")
    assert sorted((r["algorithm"], r["seed"]) for r in first["results"]) == sorted(
        (a, s) for a in ALGORITHMS for s in (0, 1))
    budget, steps = rollout_budget(cfg)
    for r in first["results"]:
        assert r["rollouts"] == (budget if r["algorithm"] == "search_e1" else steps * 4)
        assert 0.0 <= r["test"]["all"]["em"] <= 1.0 and r["test"]["all"]["n"] == 5
        saved = json.loads((tmp_path / "abl" / r["algorithm"] / f"seed_{r['seed']}" / "result.json").read_text())
        # every test question's outcome, consistent with the per-kind scores
        qs = saved["questions"]
        assert len(qs) == 5 and all(set(q) >= {"em", "first_query_hit", "kind"} for q in qs.values())
        assert sum(q["em"] for q in qs.values()) / 5 == pytest.approx(saved["test"]["all"]["em"])
        assert sum(q["first_query_hit"] for q in qs.values()) / 5 == pytest.approx(saved["test"]["all"]["first_query_hit"])
        assert r["curve"] and all(len(p) == 3 and p[2] is not None for p in r["curve"])  # dev first-query hit too
    start = json.loads((tmp_path / "abl" / "start.json").read_text())
    assert len(start["questions"]) == 5 and start["dev_first_query_hit"] is not None
    # Search-E1's first GRPO round is the GRPO arm's first grpo_steps steps with the same seed (paired): the
    # same rollouts and the same update
    rows = lambda path: [json.loads(l) for l in path.read_text().splitlines() if l.strip()]  # noqa: E731
    same = ("critic/score/mean", "response_length/mean", "env/number_of_valid_search", "actor/pg_loss", "actor/entropy")
    for seed in (0, 1):
        grpo_rows = rows(tmp_path / "abl" / "grpo" / f"seed_{seed}" / "metrics.jsonl")
        e1_rows = rows(tmp_path / "abl" / "search_e1" / f"seed_{seed}" / "cycle_0" / "grpo" / "metrics.jsonl")
        assert len(e1_rows) == cfg.search_e1.grpo_steps < len(grpo_rows)
        for a, b in zip(e1_rows, grpo_rows):
            assert {k: a[k] for k in same} == pytest.approx({k: b[k] for k in same}, rel=1e-6), seed
    text = results.read_text()
    for label in ("warm start", "GRPO", "SD-Search", "Search-E1"):
        assert f"| {label} |" in text
    assert text.count("±") >= 12 and "sdsearch ablate --seeds 0 1" in text
    assert "| method | runs | test EM (95% CI) | test first-query hit (95% CI) | minutes per run |" in text
    assert "min wall time" in text and "t_{0.975,k−1}" in text and "1.96·√(p(1−p)/n)" in text
    assert "## Paired comparison against GRPO" in text
    for method in ("SD-Search", "Search-E1"):
        for metric in ("EM", "first-query hit"):
            assert f"| {method} − GRPO | {metric} | seeds 0, 1 | 2 |" in text
            assert f"| {method} − GRPO | {metric} | questions (seeds 0, 1) | 5 |" in text
    assert "Comparisons whose 95% CI excludes 0:" in text or "No comparison's 95% CI excludes 0" in text
    assert "left out of the question-paired" not in text.lower()
    assert (tmp_path / "docs" / "results_curves.png").stat().st_size > 5_000
    # A hand-written analysis survives a re-run, and finished runs are reused, not retrained.
    results.write_text(text + "\n## Analysis\n\nOur reading of the numbers.\n")
    stamp = (tmp_path / "abl" / "grpo" / "seed_0" / "result.json").stat().st_mtime_ns
    from dataclasses import replace

    resumed = replace(cfg, trainer=replace(cfg.trainer, resume=True))  # a re-run continues with resume
    second = run_ablation(resumed, [0, 1], tmp_path / "abl", results, "sdsearch ablate --seeds 0 1")
    assert (tmp_path / "abl" / "grpo" / "seed_0" / "result.json").stat().st_mtime_ns == stamp
    assert json.dumps(second["results"], sort_keys=True) == json.dumps(first["results"], sort_keys=True)
    assert "Our reading of the numbers." in results.read_text()
    spent = json.loads((tmp_path / "abl" / "wall_time.json").read_text())
    assert spent["invocations"] == 2 and spent["seconds"] >= first["wall_s"] + second["wall_s"] - 1e-6
    assert f"{spent['seconds'] / 60:.1f} min wall time over 2 invocations" in results.read_text()


# ---------------------------------------------------------------------------------------------------
# The statistics, on hand-computed numbers
# ---------------------------------------------------------------------------------------------------
def _run(alg, seed, em, fqh=None, questions=None):
    test = {"all": {"n": 3, "em": em, **({"first_query_hit": fqh} if fqh is not None else {})}}
    r = {"algorithm": alg, "seed": seed, "rollouts": 8, "test": test, "curve": [[4, 0.5]], "seconds": 60.0}
    if questions is not None:
        r["questions"] = {q: {"kind": "single_hop", **v} for q, v in questions.items()}
    return r


def _hand_runs():
    """Seeds 0 and 1 keep per-question outcomes; seed 2 is an older result.json (per-kind scores only).
    Question c records no evidence passages (no first-query hit)."""
    g0 = {"a": {"em": 1.0, "first_query_hit": 0.0}, "b": {"em": 0.0, "first_query_hit": 0.0}, "c": {"em": 0.0}}
    g1 = {"a": {"em": 1.0, "first_query_hit": 0.0}, "b": {"em": 1.0, "first_query_hit": 0.0}, "c": {"em": 0.0}}
    m0 = {"a": {"em": 1.0, "first_query_hit": 1.0}, "b": {"em": 1.0, "first_query_hit": 1.0}, "c": {"em": 1.0}}
    m1 = {"a": {"em": 0.0, "first_query_hit": 1.0}, "b": {"em": 1.0, "first_query_hit": 1.0}, "c": {"em": 0.0}}
    return [_run("grpo", 0, 1 / 3, 0.0, g0), _run("grpo", 1, 2 / 3, 0.0, g1), _run("grpo", 2, 0.5, 0.5),
            _run("sd_search", 0, 1.0, 1.0, m0), _run("sd_search", 1, 1 / 3, 1.0, m1), _run("sd_search", 2, 0.5, 0.5)]


@pytest.mark.parametrize("scipy", [True, False])
def test_t_interval_of_three_values(monkeypatch, scipy):
    if not scipy:  # the fallback table of t quantiles
        monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert ablation.t_quantile(2) == pytest.approx(4.302653, abs=1e-4)
    assert ablation.t_quantile(30) == pytest.approx(2.042272, abs=1e-4)
    mean, half = ablation.t_interval([0.1, 0.2, 0.3])  # sd 0.1: half = 4.302653 * 0.1 / sqrt(3)
    assert mean == pytest.approx(0.2) and half == pytest.approx(0.248414, abs=1e-4)
    mean, half = ablation.t_interval([0.4])
    assert mean == 0.4 and math.isnan(half)


@pytest.mark.parametrize("scipy", [True, False])
def test_one_sided_t_tail_and_holm_on_hand_values(monkeypatch, scipy):
    if not scipy:  # the incomplete-beta fallback
        monkeypatch.setitem(sys.modules, "scipy.stats", None)
    # tables: P(T_5 > 2.015) = 0.05, P(T_2 > 4.303) = 0.025, P(T_10 > 0) = 0.5; symmetry for negative t
    assert ablation.t_sf(2.015048, 5) == pytest.approx(0.05, abs=1e-6)
    assert ablation.t_sf(4.302653, 2) == pytest.approx(0.025, abs=1e-6)
    assert ablation.t_sf(0.0, 10) == pytest.approx(0.5)
    assert ablation.t_sf(-2.015048, 5) == pytest.approx(0.95, abs=1e-6)
    # Holm: sorted p 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 with the running maximum
    assert ablation.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_arms_contrasts_and_the_preregistered_family():
    """Arms carry their overrides; the family is every arm against GRPO plus SD-Search against its placebo;
    one-sided seed-paired t tests, Holm-adjusted, on hand numbers."""
    from nemo_sdsearch.config import load_config

    cfg = load_config("tiny_cpu")
    assert ablation.arm_config(cfg, "sd_placebo").sd.hindsight_source == "other_question"
    assert ablation.arm_config(cfg, "sd_others").sd.hindsight_members == "others"
    assert ablation.arm_config(cfg, "sd_others").algorithm == "sd_search"
    assert ablation.arm_config(cfg, "grpo").algorithm == "grpo"
    with pytest.raises(ValueError, match="unknown ablation arm"):
        ablation.arm_config(cfg, "placebo")
    fqh = {"grpo": [0.50, 0.60, 0.55], "sd_search": [0.60, 0.70, 0.65], "sd_placebo": [0.52, 0.58, 0.57]}
    runs = [_run(arm, seed, 0.5, v) for arm, vs in fqh.items() for seed, v in enumerate(vs)]
    assert ablation.contrasts_of(runs) == [("sd_search", "grpo"), ("sd_placebo", "grpo"), ("sd_search", "sd_placebo")]
    rows = {(r["method"], r["base"]): r for r in ablation.one_sided_tests(runs)}
    # SD-Search - GRPO: +0.10 on every seed: sd 0 -> p 0; placebo - GRPO: +0.02, -0.02, +0.02: mean 1/150,
    # sd 0.023094, t 0.5 over 2 df -> p 0.33333; SD-Search - placebo: +0.08, +0.12, +0.08: mean 0.09333,
    # sd 0.023094, t 7.0 -> p 0.0099
    assert rows[("sd_search", "grpo")]["p"] == 0.0
    assert rows[("sd_placebo", "grpo")]["t"] == pytest.approx(0.5) and rows[("sd_placebo", "grpo")]["p"] == pytest.approx(1 / 3)
    assert rows[("sd_search", "sd_placebo")]["t"] == pytest.approx(7.0)
    p = rows[("sd_search", "sd_placebo")]["p"]
    assert rows[("sd_search", "sd_placebo")]["p_holm"] == pytest.approx(2 * p)  # second smallest of three: x2
    assert rows[("sd_placebo", "grpo")]["p_holm"] == pytest.approx(1 / 3)
    assert [r["reject"] for r in rows.values()] == [True, False, True]
    text = ablation.results_markdown({"all": {"n": 3, "em": 0.4}}, runs, 8, "cmd", "machine",
                                     preregistration="## Pre-registration\n\nWritten before.\n")
    assert text.index("## Pre-registration") < text.index("| method | runs |") < text.index("## Pre-registered tests")
    assert "| SD-Search − SD-Search, placebo block | 3 | +0.093 |" in text


def test_the_preregistration_section_survives_a_rewrite(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Title\n\n## Pre-registration\n\nRules.\n### Decision\n\nA.\n\n## Paired comparison\n\nold\n"
                    "\n## Analysis\n\nreading\n")
    assert ablation.kept_preregistration(path) == "## Pre-registration\n\nRules.\n### Decision\n\nA.\n\n"
    assert ablation.kept_analysis(path) == "## Analysis\n\nreading\n"
    assert ablation.kept_preregistration(tmp_path / "none.md") == ""
    # the pre-registration's own `### Analysis` (the analysis plan) is not the hand-written analysis: before the
    # results exist there is none, and a rewrite must not copy the plan (and what follows it) below the results
    path.write_text("## Pre-registration\n\n### Analysis\n\nplan\n\n## Progress\n\npartial\n")
    assert ablation.kept_analysis(path) == ""
    text = ablation.results_markdown({"all": {"n": 3, "em": 0.4}}, [], 8, "cmd", "machine",
                                     ablation.kept_analysis(path), preregistration=ablation.kept_preregistration(path))
    assert text.count("### Analysis") == 1 and "## Progress" not in text
    # a file the writer wrote, rewritten: the same file (the results block is not kept as pre-registration)
    path.write_text(ablation.results_markdown({"all": {"n": 3, "em": 0.4}}, _hand_runs(), 8, "cmd", "machine",
                                              preregistration="## Pre-registration\n\nRules.\n"))
    again = ablation.results_markdown({"all": {"n": 3, "em": 0.4}}, _hand_runs(), 8, "cmd", "machine",
                                      ablation.kept_analysis(path), preregistration=ablation.kept_preregistration(path))
    assert again == path.read_text() and again.count("Written by") == 1


def test_binomial_interval():
    assert ablation.binomial_interval(0.4, 100) == pytest.approx(0.096020, abs=1e-5)  # 1.96 * sqrt(0.24 / 100)
    assert ablation.binomial_interval(0.0, 50) == 0.0


def test_seed_and_question_paired_differences():
    runs = _hand_runs()
    sd, gr = [r for r in runs if r["algorithm"] == "sd_search"], [r for r in runs if r["algorithm"] == "grpo"]
    # seed-paired EM: per-seed differences +2/3, -1/3, 0 -> mean 1/9, sd sqrt(21/81), half 4.302653 * sd / sqrt(3)
    s = ablation.seed_paired(sd, gr, "em")
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2]
    assert s["mean"] == pytest.approx(1 / 9) and s["half"] == pytest.approx(1.264859, abs=1e-4)
    assert (s["better"], s["worse"], s["excludes_zero"]) == (1, 1, False)
    # question-paired EM over seeds 0 and 1 (seed 2 keeps no outcomes): per question the mean over seeds of
    # (SD-Search - GRPO): a (0 - 1) / 2 = -0.5, b (1 + 0) / 2 = 0.5, c (1 + 0) / 2 = 0.5
    # -> mean 1/6, sd sqrt(1/3), half 1.96 * sqrt(1/3) / sqrt(3) = 0.65332
    q = ablation.question_paired(sd, gr, "em")
    assert q["n"] == 3 and q["seeds"] == [0, 1]
    assert q["mean"] == pytest.approx(1 / 6) and q["half"] == pytest.approx(0.653321, abs=1e-5)
    assert (q["better"], q["worse"], q["same"], q["excludes_zero"]) == (2, 1, 0, False)
    # first-query hit: questions a and b only (c records no evidence); +1 on both -> sd 0, interval [1, 1]
    f = ablation.question_paired(sd, gr, "first_query_hit")
    assert (f["n"], f["mean"], f["half"], f["better"], f["excludes_zero"]) == (2, 1.0, 0.0, 2, True)


def test_results_markdown_states_the_comparisons(tmp_path):
    runs = _hand_runs()
    start = {"all": {"n": 100, "em": 0.4, "f1": 0.5, "searches": 1.0, "n_evidence": 100, "first_query_hit": 0.5},
             "single_hop": {"n": 100, "em": 0.4}}
    text = ablation.results_markdown(start, runs, 8, "sdsearch ablate --seeds 0 1 2", "test machine", wall_s=600.0)
    assert "| warm start | 1 | 0.400 ± 0.096 | 0.500 ± 0.098 | |" in text  # binomial intervals
    assert "| GRPO | 3 | 0.500 ± 0.414 |" in text  # sd 1/6, t 4.302653 / sqrt(3)
    assert "| SD-Search − GRPO | EM | seeds 0, 1, 2 | 3 | +0.111 [-1.154, +1.376] | no | 1 / 1 / 1 seeds |" in text
    assert "| SD-Search − GRPO | EM | questions (seeds 0, 1) | 3 | +0.167 [-0.487, +0.820] | no | 2 / 1 / 0 questions |" in text
    assert "Comparisons whose 95% CI excludes 0:" in text
    assert "- SD-Search vs GRPO, first-query hit, question-paired: +1.000 [+1.000, +1.000]: SD-Search is better" in text
    assert "GRPO seed 2, SD-Search seed 2" in text  # the runs without per-question outcomes, named
    assert "10.0 min wall time" in text and "Stale" not in text
    ablation.plot_curves(runs, 0.4, tmp_path / "c.png", 0.5)  # old 2-element curve points: EM panel only
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_search_e1_curve_places_rounds_where_they_measured(tmp_path):
    """A GRPO round's dev evaluation sits at the step it was taken (the state's dev_step, else the round's
    summary.json); an OPSD round shows its start and the adapter it kept at the rollouts consumed up to its
    pool, one above the other."""
    cfg = load_config("tiny_cpu", ["search_e1.grpo_steps=15", "trainer.questions_per_step=8", "rollout.group_size=5",
                                   "search_e1.pool_questions=48", "search_e1.pool_samples=5"])
    per_step, round_rollouts = 40, 15 * 40 + 48 * 5
    (tmp_path / "cycle_1" / "grpo").mkdir(parents=True)
    (tmp_path / "cycle_1" / "grpo" / "summary.json").write_text(json.dumps(
        {"evals": [{"step": 5, "val/dev_em": 0.55}, {"step": 10, "val/dev_em": 0.6}, {"step": 10, "test_em": 0.1}]}))
    rounds = [
        {"cycle": 0, "stage": "grpo", "dev_em": 0.5, "dev_first_query_hit": 0.7, "dev_step": 10},
        {"cycle": 0, "stage": "opsd", "dev_em": 0.65, "dev_first_query_hit": 0.98, "dev_em_before": 0.6,
         "dev_first_query_hit_before": 0.95, "best_step": 10},
        {"cycle": 1, "stage": "grpo", "dev_em": 0.6, "dev_first_query_hit": 0.9},   # older state: no dev_step
        {"cycle": 1, "stage": "opsd", "dev_em": 0.6, "dev_first_query_hit": 0.9, "best_step": 0},  # no "before"
    ]
    assert ablation.search_e1_curve(cfg, rounds, tmp_path) == [
        [10 * per_step, 0.5, 0.7],
        [round_rollouts, 0.6, 0.95], [round_rollouts, 0.65, 0.98],
        [round_rollouts + 10 * per_step, 0.6, 0.9],
        [2 * round_rollouts, 0.6, 0.9],
    ]


def test_ablate_command_line_takes_overrides_after_the_seeds(monkeypatch, tmp_path):
    """`sdsearch ablate --seeds 0 1 search_e1.cycles=1`: the key=value words after --seeds are overrides; the
    command recorded in the results is the one that reproduces them (resuming changes nothing, so it is left
    out)."""
    from nemo_sdsearch import cli

    calls = []
    monkeypatch.setattr(ablation, "run_ablation", lambda cfg, seeds, out, results, command, console, algorithms:
                        calls.append((cfg, seeds, command, algorithms)))
    assert cli.main(["ablate", "--seeds", "0", "1", "search_e1.cycles=1", "trainer.resume=true",
                     "--out", str(tmp_path)]) == 0
    cfg, seeds, command, arms = calls[0]
    assert seeds == [0, 1] and cfg.search_e1.cycles == 1 and cfg.trainer.resume and arms == ALGORITHMS
    assert command == "sdsearch ablate --seeds 0 1 search_e1.cycles=1"
    assert cli.main(["ablate", "--seeds", "3", "--arms", "grpo", "sd_placebo", "--out", str(tmp_path)]) == 0
    assert calls[-1][3] == ("grpo", "sd_placebo") and calls[-1][2] == "sdsearch ablate --seeds 3 --arms grpo sd_placebo"
    with pytest.raises(SystemExit):
        cli.main(["ablate", "--seeds", "3", "--arms", "grpo", "placebo", "--out", str(tmp_path)])
    calls.pop()
    assert cli.main(["ablate", "trainer.eval_every=7", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert calls[1][1] == [2] and calls[1][0].trainer.eval_every == 7
    with pytest.raises(SystemExit, match="integers"):
        cli.main(["ablate", "--seeds", "zero", "--out", str(tmp_path)])
