"""End-of-training outputs: the summary table and the PNG plot of the curves (metric names as in the
README's Metrics section)."""

from __future__ import annotations

import math
from pathlib import Path

# (metrics.jsonl key, what its panel of curves.png shows)
CURVES = (("critic/score/mean", "score (EM of the rollouts)"), ("sd/jsd", "JSD at query positions"),
          ("env/number_of_valid_search", "searches per rollout"), ("actor/kl_loss", "k3 KL to reference"))
# the training metrics of the end-of-run table
SUMMARY = ("critic/score/mean", "env/number_of_valid_search", "env/finish_ratio", "response_length/mean",
           "sd/jsd", "actor/kl_loss", "actor/entropy")


def plot_curves(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(22, 3.8))
    for ax, (key, label) in zip(axes, CURVES):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker=".")
        ax.set_title(f"{label}\n{key}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    dev = [e for e in evals if "val/dev_em" in e]
    if dev:
        ax.plot([e["step"] for e in dev], [e["val/dev_em"] for e in dev], marker="o", label="val/dev_em (greedy)")
    test = [e for e in evals if "val/test_em" in e]
    if test:
        ax.scatter([e["step"] for e in test], [e["val/test_em"] for e in test], color="red", zorder=3,
                   label="val/test_em")
    ax.set_title("EM")
    ax.set_xlabel("step")
    if dev or test:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_CAPTION = "test EM: start and end weights; training metrics: mean of the first and last 20% of steps"


def summary_rows(start: dict | None, end: dict | None, history: list[dict]) -> list[tuple[str, str, str]]:
    """(metric, start, end) rows of the end-of-run table (see SUMMARY_CAPTION)."""
    rows = []
    if start and end:
        for kind in end:
            rows.append((f"test EM ({kind})", f"{start[kind]['em']:.3f}", f"{end[kind]['em']:.3f}"))
    if history:
        first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
        for key in SUMMARY:
            a = [h[key] for h in first if key in h and not math.isnan(h[key])]
            b = [h[key] for h in last if key in h and not math.isnan(h[key])]
            if a and b:
                rows.append((key, f"{sum(a) / len(a):.4f}", f"{sum(b) / len(b):.4f}"))
    return rows
