"""``caff report``: per-run summary and accuracy against rounds, uploaded bytes and FLOPs."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from profiles import one_line_validation_error


class _Client(BaseModel):
    """What the report reads of a client's record; a trained client has a peak and a budget (bytes)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    status: str
    peak_bytes: int | None = Field(default=None, ge=0)
    memory_budget_bytes: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _trained_has_figures(self) -> "_Client":
        if self.status == "trained" and None in (self.peak_bytes, self.memory_budget_bytes):
            raise ValueError("a trained client needs peak_bytes and memory_budget_bytes")
        return self


class _Row(BaseModel):
    """What the report reads of a round's row of metrics.jsonl; ``test_accuracy`` is null in rounds
    not evaluated (``--eval-every``)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    round: int = Field(ge=1)
    method: str
    model: str
    test_accuracy: float | None = Field(ge=0, le=1)
    uploaded_bytes: int = Field(ge=0)
    flops: int = Field(ge=0)
    clients: list[_Client]


def load_runs(paths: list[str]) -> dict[str, list[dict]]:
    """Each run directory's rows of metrics.jsonl; ValueError naming the file and line of a bad row."""
    runs = {}
    for path in paths:
        metrics = Path(path) / "metrics.jsonl"
        if not metrics.is_file():
            raise ValueError(f"{path}: no metrics.jsonl (not a caff train run directory)")
        try:
            lines = metrics.read_bytes().split(b"\n")
        except OSError as exc:
            raise ValueError(f"cannot read {metrics}: {exc.strerror}") from None
        runs[path] = [_row(metrics, number, line) for number, line in enumerate(lines, 1) if line.strip()]
        if not runs[path]:
            raise ValueError(f"{path}: metrics.jsonl is empty")
    return runs


def _row(metrics: Path, number: int, line: bytes) -> dict:
    try:
        row = pydantic_core.from_json(line.decode("utf-8"), allow_inf_nan=False)
        _Row.model_validate(row)
    except UnicodeDecodeError:
        raise ValueError(f"{metrics} line {number}: not UTF-8") from None
    except ValidationError as exc:
        raise ValueError(f"{metrics} line {number}: {one_line_validation_error(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{metrics} line {number}: not JSON ({exc})") from None
    return row


def summary_rows(runs: dict[str, list[dict]]) -> list[str]:
    from profiles import format_bytes, format_flops

    rows = [f"{'run':28s} {'method':8s} {'model':12s} {'rounds':>6s} {'last acc':>9s} {'best acc':>8s} "
            f"{'trained/round':>13s} {'uploaded':>11s} {'FLOPs':>13s} {'max peak/budget':>15s}"]
    for path, metrics in runs.items():
        clients = [c for m in metrics for c in m["clients"] if c["status"] == "trained"]
        ratio = max((c["peak_bytes"] / c["memory_budget_bytes"] for c in clients), default=0.0)
        per_round = len(clients) / len(metrics)
        tested = [m["test_accuracy"] for m in metrics if m["test_accuracy"] is not None]
        final, best = (f"{tested[-1]:9.3f}", f"{max(tested):8.3f}") if tested else (f"{'-':>9s}", f"{'-':>8s}")
        rows.append(f"{Path(path).name:28s} {metrics[0]['method']:8s} {metrics[0]['model']:12s} {len(metrics):6d} "
                    f"{final} {best} "
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
