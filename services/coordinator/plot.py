"""PNG of a run's curves from its metrics.jsonl: training reward, held-out accuracy, response length,
KL to the reference, entropy and clip fraction, per step."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (title, y label, [(metric, legend label)]); a panel draws the metrics present in the rows
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("training reward", "mean reward", [("reward/mean", "train (sampled)")]),
    ("held-out accuracy", "accuracy", [("eval/accuracy", "greedy"), ("eval/sampled/accuracy", "sampled")]),
    ("response length", "tokens", [("response_length/mean", "train"), ("eval/response_length", "eval, greedy")]),
    ("KL to reference", "k3 KL", [("train/kl", "train")]),
    ("entropy", "nats / token", [("train/entropy", "train")]),
    ("clip fraction", "fraction of tokens", [("train/clip_frac", "train")]),
]


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have `key` (training rows and evaluation rows differ)."""
    have = [r for r in rows if key in r]
    return [r["step"] for r in have], [r[key] for r in have]


def plot_run(metrics_path: str, out_png: str, title: str = "rlgrid GRPO") -> str:
    """Writes the curves of the run whose metrics.jsonl is `metrics_path` to `out_png`."""
    fig = figure(read_metrics(metrics_path), title)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def figure(rows: list[dict], title: str):
    """The figure: one panel per PANELS entry, each with the metrics the rows have."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    for ax, (name, ylabel, keys) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o", ms=3, label=label)
                drawn += 1
        if not drawn:
            hint = "no held-out evaluation (runtime_args.eval_data_path)" if name.startswith("held-out") else "no data"
            ax.text(0.5, 0.5, hint, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
        elif len(keys) > 1:
            ax.legend(fontsize=8)
        if name == "KL to reference" and drawn and not any(series(rows, "train/kl")[1]):
            ax.text(0.5, 0.6, "0: models.policy_trainer.kl_coef=0 (no reference model)", ha="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
        if name == "held-out accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="step", ylabel=ylabel, title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
