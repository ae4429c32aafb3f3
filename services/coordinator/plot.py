"""PNG plot of a run's reward and response length per step (from its metrics.jsonl)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(metrics_path: str, out_png: str, title: str = "rlgrid GRPO") -> str:
    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [r["reward/mean"] for r in rows], marker="o", ms=3)
    ax1.set(xlabel="step", ylabel="mean reward", title="reward")
    ax2.plot(steps, [r["response_length/mean"] for r in rows], marker="o", ms=3, color="tab:orange")
    ax2.set(xlabel="step", ylabel="mean response tokens", title="response length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
