"""The three-way ablation: GRPO, SD-Search and Search-E1 at equal rollout budget, several seeds each.

    sdsearch ablate [--seeds 0 1 2] [--out runs/ablation] [--results docs/results.md] [key=value ...]

The budget is Search-E1's: `cycles x (grpo_steps x B x G + pool_questions x pool_samples)` rollouts
(its GRPO rounds plus its rollout pools; the OPSD rounds train on pool rollouts and sample none).
GRPO and SD-Search get `round(budget / (B x G))` steps of B x G rollouts. Dev evaluations are not
counted (all three spend the same on them). Every run lives in `OUT/<algorithm>/seed_<s>`. A new
ablation needs an empty OUT (or `trainer.overwrite=true`); with `trainer.resume=true` a killed ablation
continues where it stopped: finished runs (their `result.json` exists) are kept, interrupted ones resumed. At the end: a mean +- std test-EM table per question kind, written to the
results file with the command and the wall time, and a PNG of dev EM against rollouts consumed.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

ALGORITHMS = ("grpo", "sd_search", "search_e1")
LABELS = {"grpo": "GRPO", "sd_search": "SD-Search", "search_e1": "Search-E1", "start": "warm start"}
KINDS = ("all", "single_hop", "bridge", "comparison")


def rollout_budget(cfg) -> tuple[int, int]:
    """(Search-E1's rollouts, the GRPO / SD-Search step count that matches them)."""
    e1, per_step = cfg.search_e1, cfg.trainer.questions_per_step * cfg.rollout.group_size
    budget = cfg.cycles * (e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples)
    return budget, max(1, round(budget / per_step))


def _test_em(cfg, model_dir: str) -> dict:
    from nemo_sdsearch.algorithms.setup import build_components, greedy_em

    _, _, _, data, engines, _ = build_components(
        replace(cfg, model=replace(cfg.model, path=model_dir), grpo=replace(cfg.grpo, kl_coef=0.0)))
    return greedy_em(engines["test"], data["test"], cfg.trainer.eval_batch_size)


def run_one(cfg, algorithm: str, seed: int, out: Path, console) -> dict:
    from nemo_sdsearch.algorithms import grpo, search_e1

    run_dir = out / algorithm / f"seed_{seed}"
    done = run_dir / "result.json"
    if done.exists():
        console.print(f"[dim]{algorithm} seed {seed}: done earlier, kept ({done})[/dim]")
        return json.loads(done.read_text())
    budget, steps = rollout_budget(cfg)
    per_step = cfg.trainer.questions_per_step * cfg.rollout.group_size
    rcfg = replace(cfg, algorithm=algorithm,
                   trainer=replace(cfg.trainer, seed=seed, out_dir=str(run_dir), overwrite=False,
                                   final_test_eval=False,
                                   steps=steps if algorithm != "search_e1" else cfg.trainer.steps))
    console.rule(f"ablation: {LABELS[algorithm]}, seed {seed}")
    t0 = time.perf_counter()
    curve = []  # (rollouts consumed, dev EM)
    if algorithm == "search_e1":
        state = search_e1.run(rcfg, console, progress=False)
        test, model_dir = state["final_test"], state["final_model"]
        e1 = cfg.search_e1
        round_rollouts = e1.grpo_steps * per_step + e1.pool_questions * e1.pool_samples
        for rd in state["rounds"]:
            used = rd["cycle"] * round_rollouts + e1.grpo_steps * per_step
            if rd["stage"] == "opsd":
                used = (rd["cycle"] + 1) * round_rollouts
            if rd["dev_em"] is not None:
                curve.append((used, rd["dev_em"]))
    else:
        summary = grpo.train(rcfg, console, progress=False)
        model_dir = str(run_dir / "final")
        test = _test_em(rcfg, model_dir)
        curve = [(e["step"] * per_step, e["val/dev_em"]) for e in summary["evals"] if "val/dev_em" in e]
    result = {"algorithm": algorithm, "seed": seed, "rollouts": budget if algorithm == "search_e1" else steps * per_step,
              "test": test, "curve": curve, "seconds": time.perf_counter() - t0, "model": model_dir}
    done.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


EM_DEFINITIONS = {
    "squad": "EM uses the SQuAD / Search-R1 answer normalisation (lower case, ASCII punctuation and a/an/the "
             "removed, whitespace collapsed), as the papers' tables do.",
    "unicode": "EM uses the lenient Unicode normalisation (reward.normalization=unicode: NFKC, all Unicode "
               "punctuation removed); not comparable with the papers' tables.",
}


def results_markdown(start: dict, results: list[dict], budget: int, command: str, machine: str,
                     analysis: str = "", normalization: str = "squad") -> str:
    seeds = sorted({r["seed"] for r in results})
    total_min = sum(r["seconds"] for r in results) / 60
    lines = [
        "# Ablation: GRPO vs SD-Search vs Search-E1 on the tiny world",
        "",
        f"Written by `{command}` on {machine}: {len(results)} runs, {total_min:.1f} min of training in all.",
        f"Seeds {seeds}; equal rollout budget of about {budget} training rollouts per run; test EM is greedy,",
        "on the whole bundled test world (a different world from training), BM25 top-3.",
        EM_DEFINITIONS[normalization],
        "",
        "| method | " + " | ".join(KINDS) + " | runs | minutes per run |",
        "|---|" + "---|" * (len(KINDS) + 2),
        f"| {LABELS['start']} | " + " | ".join(f"{start[k]['em']:.3f}" for k in KINDS) + " | 1 | |",
    ]
    for alg in ALGORITHMS:
        rs = [r for r in results if r["algorithm"] == alg]
        if not rs:
            continue
        cells = [_mean_std([r["test"][k]["em"] for r in rs]) for k in KINDS]
        minutes = statistics.mean(r["seconds"] for r in rs) / 60
        lines.append(f"| {LABELS[alg]} | " + " | ".join(cells) + f" | {len(rs)} | {minutes:.1f} |")
    lines += ["", "Per run (test EM, all questions):", ""]
    lines += [f"- {LABELS[r['algorithm']]} seed {r['seed']}: {r['test']['all']['em']:.3f} "
              f"({r['rollouts']} rollouts, {r['seconds'] / 60:.1f} min)" for r in results]
    lines += ["", "![dev EM against rollouts](results_curves.png)", ""]
    if analysis:
        lines += [analysis.rstrip(), ""]
    return "\n".join(lines)


def kept_analysis(path: Path) -> str:
    """The hand-written `## Analysis` section of an existing results file (kept across re-runs)."""
    if not path.exists():
        return ""
    text = path.read_text()
    i = text.find("## Analysis")
    return text[i:] if i >= 0 else ""


def plot_curves(results: list[dict], start_dev: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, alg in enumerate(ALGORITHMS):
        for j, r in enumerate(r for r in results if r["algorithm"] == alg):
            pts = ([(0, start_dev)] if start_dev is not None else []) + [tuple(p) for p in r["curve"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.8, marker=".",
                        label=LABELS[alg] if j == 0 else None)
    ax.set_xlabel("training rollouts")
    ax.set_ylabel("dev EM (greedy)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ablation(cfg, seeds: list[int], out: Path, results_path: Path, command: str, console=None,
                 algorithms=ALGORITHMS) -> dict:
    import platform

    from rich.console import Console
    from rich.table import Table

    from nemo_sdsearch.algorithms.setup import build_components, greedy_em
    from nemo_sdsearch.algorithms.state import check_out_dir, clear_out_dir
    from nemo_sdsearch.world.assets import default_model_dir

    console = console or Console()
    check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)
    clear_out_dir(out, cfg.trainer.overwrite)
    t0 = time.perf_counter()
    budget, steps = rollout_budget(cfg)
    console.print(f"rollout budget {budget} per run: GRPO / SD-Search {steps} steps; "
                  f"Search-E1 {cfg.cycles} cycles of {cfg.search_e1.grpo_steps} GRPO steps + pools")
    start_file = out / "start.json"
    if start_file.exists():
        start = json.loads(start_file.read_text())
    else:
        start_cfg = replace(cfg, model=replace(cfg.model, path=cfg.model.path or str(default_model_dir())),
                            grpo=replace(cfg.grpo, kl_coef=0.0))
        _, _, _, data, engines, _ = build_components(start_cfg)
        start = {"test": greedy_em(engines["test"], data["test"], cfg.trainer.eval_batch_size),
                 "dev": greedy_em(engines["dev"], data["dev"], cfg.trainer.eval_batch_size)["all"]["em"]}
        start_file.write_text(json.dumps(start, indent=1))
    # Seed-major order: an ablation stopped early (and re-run with fewer --seeds) has whole seeds.
    results = [run_one(cfg, alg, s, out, console) for s in seeds for alg in algorithms]
    wall = time.perf_counter() - t0
    results_path.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, start["dev"], results_path.parent / "results_curves.png")
    machine = f"{platform.machine()} CPU, {cfg.model.threads} threads"
    results_path.write_text(results_markdown(start["test"], results, budget, command, machine,
                                             kept_analysis(results_path), cfg.reward.normalization))
    table = Table(title="test EM (mean ± std over seeds)")
    for col in ("method", *KINDS):
        table.add_column(col)
    table.add_row(LABELS["start"], *(f"{start['test'][k]['em']:.3f}" for k in KINDS))
    for alg in algorithms:
        rs = [r for r in results if r["algorithm"] == alg]
        table.add_row(LABELS[alg], *(_mean_std([r["test"][k]["em"] for r in rs]) for k in KINDS))
    console.print(table)
    console.print(f"wrote {results_path} and {results_path.parent / 'results_curves.png'} ({wall / 60:.1f} min)")
    return {"start": start, "results": results, "wall_s": wall}
