"""``caff report``: per-run summary and accuracy against rounds, uploaded bytes and FLOPs."""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path


def load_runs(paths: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for path in paths:
        metrics = Path(path) / "metrics.jsonl"
        if not metrics.is_file():
            raise ValueError(f"{path}: no metrics.jsonl (not a caff train run directory)")
        runs[path] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not runs[path]:
            raise ValueError(f"{path}: metrics.jsonl is empty")
    return runs


def summary_rows(runs: dict[str, list[dict]]) -> list[str]:
    from profiles import format_bytes, format_flops

    rows = [f"{'run':28s} {'method':8s} {'model':12s} {'rounds':>6s} {'final acc':>9s} {'best acc':>8s} "
            f"{'trained/round':>13s} {'uploaded':>11s} {'FLOPs':>13s} {'max peak/budget':>15s}"]
    for path, metrics in runs.items():
        clients = [c for m in metrics for c in m["clients"] if c["status"] == "trained"]
        ratio = max((c["peak_bytes"] / c["memory_budget_bytes"] for c in clients), default=0.0)
        per_round = len(clients) / len(metrics)
        rows.append(f"{Path(path).name:28s} {metrics[0]['method']:8s} {metrics[0]['model']:12s} {len(metrics):6d} "
                    f"{metrics[-1]['test_accuracy']:9.3f} {max(m['test_accuracy'] or 0.0 for m in metrics):8.3f} "
                    f"{per_round:13.1f} {format_bytes(sum(m['uploaded_bytes'] for m in metrics)):>11s} "
                    f"{format_flops(sum(m['flops'] for m in metrics)):>13s} {ratio:15.2f}")
    return rows


def plot_runs(runs: dict[str, list[dict]], output: str, references: dict[str, float] | None = None) -> None:
    """Accuracy against rounds, uploaded bytes and FLOPs; ``references`` (label -> accuracy) as level lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for path, metrics in runs.items():
        label = f"{Path(path).name} ({metrics[0]['method']}, {metrics[0]['model']})"
        uploaded = list(accumulate(m["uploaded_bytes"] / 2**20 for m in metrics))
        flops = list(accumulate(m["flops"] / 1e12 for m in metrics))
        tested = [i for i, m in enumerate(metrics) if m["test_accuracy"] is not None]  # see TrainConfig.eval_every
        accuracy = [metrics[i]["test_accuracy"] for i in tested]
        axes[0].plot([metrics[i]["round"] for i in tested], accuracy, marker="o", label=label)
        axes[1].plot([uploaded[i] for i in tested], accuracy, marker="o")
        axes[2].plot([flops[i] for i in tested], accuracy, marker="o")
    for axis, xlabel in zip(axes, ["round", "uploaded (MiB, cumulative)", "client FLOPs (TFLOP, cumulative)"]):
        for (label, level), style in zip((references or {}).items(), (":", "--")):
            axis.axhline(level, color="black", linestyle=style, label=label)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
