"""The ablation command: equal rollout budgets, per-run results that survive a re-run, the results file."""

import json

from nemo_sdsearch.algorithms.ablation import ALGORITHMS, rollout_budget, run_ablation
from nemo_sdsearch.config import load_config


def small_config(model_dir, out_dir):
    overrides = {
        "model.path": str(model_dir), "model.threads": 1, "trainer.questions_per_step": 2, "rollout.group_size": 2,
        "rollout.max_new_tokens": 12, "rollout.max_turns": 1, "rollout.max_context": 512, "trainer.eval_every": 1,
        "trainer.save_every": 1, "grpo.micro_batch_size": 2, "data.dev_questions": 3, "data.test_questions": 5,
        "cycles": 1, "search_e1.grpo_steps": 1, "search_e1.pool_questions": 2, "search_e1.pool_samples": 2,
        "search_e1.opsd_steps": 1, "search_e1.opsd_eval_every": 1, "trainer.out_dir": str(out_dir),
    }
    return load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])


def test_budget_matches_search_e1():
    cfg = load_config("tiny_cpu")
    budget, steps = rollout_budget(cfg)
    e1, per_step = cfg.search_e1, cfg.trainer.questions_per_step * cfg.rollout.group_size
    assert budget == cfg.cycles * (e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples)
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
        assert (tmp_path / "abl" / r["algorithm"] / f"seed_{r['seed']}" / "result.json").exists()
    text = results.read_text()
    for label in ("warm start", "GRPO", "SD-Search", "Search-E1"):
        assert f"| {label} |" in text
    assert text.count("±") >= 12 and "sdsearch ablate --seeds 0 1" in text
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
