"""End-of-training outputs: the summary table and the PNG plot of the curves (metric names as in the
README's Metrics section)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

# (metrics.jsonl key, what its panel of curves.png shows)
CURVES = (("critic/score/mean", "score (EM of the rollouts)"), ("sd/jsd", "JSD at query positions"),
          ("env/number_of_valid_search", "searches per rollout"), ("actor/kl_loss", "k3 KL to reference"))
# the training metrics of the end-of-run table
SUMMARY = ("critic/score/mean", "env/number_of_valid_search", "env/first_query_hit", "env/finish_ratio",
           "response_length/mean", "sd/jsd", "actor/kl_loss", "actor/entropy")


@contextlib.contextmanager
def figure(path: Path, ncols: int, figsize: tuple[float, float], xlabel: str, title: str | None = None):
    """One row of `ncols` panels written to the PNG `path`: yields the axes (a list) to draw on; then labels
    every panel's x axis `xlabel`, draws a light grid, adds the `title` above them, lays them out and saves at
    110 dpi. The figure is closed even when drawing fails (nothing is written then). The one matplotlib setup
    (the Agg backend: no display) of the run's curves.png and the ablation's results_curves.png.

        with figure(path, 2, (10, 3.5), "step") as (a, b):
            a.plot(steps, losses)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    axes = list(axes[0])
    try:
        yield axes
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        if title is not None:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _eval_panel(ax, evals: list[dict], metric: str, title: str) -> bool:
    """Greedy dev evaluations as a line, the start and end test evaluations as red points; whether any."""
    dev = [e for e in evals if f"val/dev_{metric}" in e]
    if dev:
        ax.plot([e["step"] for e in dev], [e[f"val/dev_{metric}"] for e in dev], marker="o",
                label=f"val/dev_{metric} (greedy)")
    test = [e for e in evals if f"val/test_{metric}" in e]
    if test:
        ax.scatter([e["step"] for e in test], [e[f"val/test_{metric}"] for e in test], color="red", zorder=3,
                   label=f"val/test_{metric}")
    ax.set_title(title)
    return bool(dev or test)


def plot_curves(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    """One panel per `CURVES` entry, one of EM (dev and test evaluations) and, when the rollouts' questions
    record evidence passages, one of the first-query hit rate (training rollouts: env/first_query_hit;
    evaluations: val/dev_first_query_hit, val/test_first_query_hit)."""
    steps = [h["step"] for h in history]
    query = any("env/first_query_hit" in h for h in history) or any(
        k in e for e in evals for k in ("val/dev_first_query_hit", "val/test_first_query_hit"))
    n = len(CURVES) + 1 + query
    with figure(path, n, (4.4 * n, 3.8), "step", title) as axes:
        for ax, (key, label) in zip(axes, CURVES):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], marker=".")
            ax.set_title(f"{label}\n{key}", fontsize=10)
        ax = axes[len(CURVES)]
        if _eval_panel(ax, evals, "em", "EM"):
            ax.legend(fontsize=8)
        if query:
            ax = axes[len(CURVES) + 1]
            train = [h for h in history if "env/first_query_hit" in h]
            if train:
                ax.plot([h["step"] for h in train], [h["env/first_query_hit"] for h in train], marker=".",
                        label="env/first_query_hit (rollouts)")
            _eval_panel(ax, evals, "first_query_hit", "first-query hit rate\n(first search retrieved the evidence)")
            ax.title.set_fontsize(10)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)


SUMMARY_CAPTION = ("test: start and end weights, ± binomial standard error sqrt(p(1-p)/n); gain: "
                   "(end - start) / sqrt(se_start² + se_end²), in standard errors; first-query hit: fraction of "
                   "questions whose first search retrieved the evidence; training metrics: mean of the first "
                   "and last 20% of steps")


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a rate p over n questions (NaN for n = 0)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def gain_in_se(start: float, se_start: float, end: float, se_end: float) -> float:
    """(end - start) / sqrt(se_start² + se_end²); NaN when both standard errors are 0 (or unknown)."""
    d = math.sqrt(se_start ** 2 + se_end ** 2)
    return (end - start) / d if d > 0 else math.nan


def _test_row(label: str, a: float, na: int, b: float, nb: int) -> tuple[str, str, str, str]:
    sa, sb = binomial_se(a, na), binomial_se(b, nb)
    z = gain_in_se(a, sa, b, sb)
    return (label, f"{a:.3f} ± {sa:.3f}", f"{b:.3f} ± {sb:.3f}", "n/a" if math.isnan(z) else f"{z:+.2f} SE")


def summary_rows(start: dict | None, end: dict | None, history: list[dict]) -> list[tuple[str, str, str, str]]:
    """(metric, start, end, gain) rows of the end-of-run table (see SUMMARY_CAPTION): test EM per question
    kind, then the test first-query hit rate per kind (where the test questions record evidence), then the
    training metrics (no gain)."""
    rows = []
    if start and end:
        kinds = [k for k in end if k in start]
        for kind in kinds:
            rows.append(_test_row(f"test EM ({kind})", start[kind]["em"], start[kind]["n"], end[kind]["em"],
                                  end[kind]["n"]))
        for kind in kinds:
            a, b = start[kind], end[kind]
            if "first_query_hit" in a and "first_query_hit" in b:
                rows.append(_test_row(f"test first-query hit ({kind})", a["first_query_hit"], a["n_evidence"],
                                      b["first_query_hit"], b["n_evidence"]))
    if history:
        first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
        for key in SUMMARY:
            a = [h[key] for h in first if key in h and not math.isnan(h[key])]
            b = [h[key] for h in last if key in h and not math.isnan(h[key])]
            if a and b:
                rows.append((key, f"{sum(a) / len(a):.4f}", f"{sum(b) / len(b):.4f}", ""))
    return rows
