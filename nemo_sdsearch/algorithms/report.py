"""End-of-training outputs: the summary table and the PNG plot of the curves."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = [("reward", "reward (EM of rollouts)"), ("jsd", "JSD at query positions"),
              ("searches_per_rollout", "searches per rollout"), ("kl", "k3 KL to reference")]
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker=".")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    if evals:
        ax.plot([e["step"] for e in evals], [e["em"] for e in evals], marker="o", label="dev EM (greedy)")
    test = [e for e in evals if "test_em" in e]
    if test:
        ax.scatter([e["step"] for e in test], [e["test_em"] for e in test], color="red", zorder=3, label="test EM")
    ax.set_title("EM")
    ax.set_xlabel("step")
    if evals:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(start: dict | None, end: dict | None, history: list[dict]) -> list[tuple[str, str, str]]:
    rows = []
    if start and end:
        for kind in end:
            rows.append((f"test EM ({kind})", f"{start[kind]['em']:.3f}", f"{end[kind]['em']:.3f}"))
    if history:
        first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
        for key in ("reward", "searches_per_rollout", "jsd", "kl", "entropy"):
            a = [h[key] for h in first if key in h]
            b = [h[key] for h in last if key in h]
            if a and b:
                rows.append((f"{key} (first/last 20% of steps)", f"{sum(a) / len(a):.4f}", f"{sum(b) / len(b):.4f}"))
    return rows
