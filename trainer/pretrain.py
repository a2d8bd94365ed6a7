"""Pretrain the zoo's tiny Transformers on data the federated clients never see.

What a model is pretrained on is its task's (`trainer.tasks.base.Task.pretraining_data`):

``gpt`` (the char GPTs, vocab 80 = `trainer.tasks.chars.CHAR_VOCAB`)
    Next-character LM on modern English, Debian's English fortune files
    (`trainer.tasks.english`); Shakespeare, the federated task, is never read. A training
    batch is ``batch`` random windows of ``max_seq_len + 1`` characters of the training text;
    input = the first ``max_seq_len``, target = the last. Held-out loss is the mean loss over
    every non-overlapping window of the held-out text (also given in bits per character).

``vit`` (vit-tiny)
    Fashion-MNIST classification of five classes (`trainer.tasks.fashion_mnist`); the other
    five are the federated task.

AdamW (betas 0.9/0.99, weight decay 0.1 on matrices only), linear warmup then
cosine decay to a tenth of ``lr`` (or constant), gradient norm clipped at 1.
Seeded: the weights come from ``build_model(spec, seed)`` and the batches from
a ``torch.Generator`` seeded with ``seed``, so a rerun gives the same loss
curve (on the same machine, torch version and thread count).
"""

from __future__ import annotations

import json
import math
import time
from typing import Literal

import torch
from torch import Tensor

from costmodel.build import build_model
from costmodel.modules import TinyTransformer
from costmodel.spec import ModelSpec

__all__ = ["PRETRAIN_DEFAULTS", "check_spec", "checkpoint_metadata", "evaluate", "lm_loss", "loss_curve", "pretrain"]

#: Settings of the committed checkpoints (``caff pretrain NAME`` uses them): steps, batch, lr.
PRETRAIN_DEFAULTS: dict[str, dict] = {
    "char-gpt-xs": {"steps": 2000, "batch": 16, "lr": 3e-3},
    "char-gpt-s": {"steps": 2000, "batch": 16, "lr": 3e-3},
    "char-gpt-m": {"steps": 500, "batch": 8, "lr": 2e-3},
    "char-gpt-l": {"steps": 300, "batch": 8, "lr": 1.5e-3},
    "vit-tiny": {"steps": 1200, "batch": 64, "lr": 1.5e-3},
}
FALLBACK_DEFAULTS = {"steps": 500, "batch": 32, "lr": 1e-3}

FINAL_LOSS_STEPS = 20  # final train loss = mean batch loss over the last this-many steps


def check_spec(spec: ModelSpec) -> None:
    from trainer.tasks.chars import VOCAB_SIZE

    if spec.kind == "gpt":
        if spec.vocab_size != VOCAB_SIZE:
            raise ValueError(f"{spec.name}: char pretraining needs vocab_size {VOCAB_SIZE}, not {spec.vocab_size}")
    elif spec.kind == "vit":
        if (spec.image_size, spec.channels, spec.n_classes) != (28, 1, 10):
            raise ValueError(f"{spec.name}: Fashion-MNIST pretraining needs image_size 28, channels 1, n_classes 10")
    else:
        raise ValueError(f"{spec.name}: pretraining supports kinds 'gpt' (char GPTs) and 'vit', not {spec.kind!r}")


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: TinyTransformer, x: Tensor, y: Tensor, batch: int = 64) -> dict:
    """Mean loss over all targets of ``(x, y)`` (per character for a GPT, per image for a
    classifier), plus ``accuracy`` for a classifier. The model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    try:
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            logits = model.head(model.features(xb))
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1), reduction="sum"))
            count += yb.numel()
            if model.spec.kind != "gpt":
                correct += int((logits.argmax(-1) == yb).sum())
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("nothing to evaluate: no samples")
    out = {"loss": total / count, "count": count}
    if model.spec.kind != "gpt":
        out["accuracy"] = correct / count
    return out


def lm_loss(model: TinyTransformer, text_or_ids: str | Tensor, seq_len: int | None = None) -> float:
    """Mean next-character loss (nats) of a char GPT on ``text`` (or 1-D ids), over
    non-overlapping windows of ``seq_len`` targets (default: the model's ``max_seq_len``)."""
    from trainer.tasks.chars import encode_tensor
    from trainer.tasks.english import lm_windows

    ids = encode_tensor(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    x, y = lm_windows(ids, seq_len or model.spec.max_seq_len)
    return evaluate(model, x, y)["loss"]


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _progress_bar():
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


def pretrain(spec: ModelSpec, steps: int, batch: int, lr: float, seed: int = 0, progress: bool = True,
             schedule: Literal["cosine", "constant"] = "cosine", warmup: int | None = None,
             weight_decay: float = 0.1) -> tuple[TinyTransformer, dict]:
    """Pretrain ``build_model(spec, seed)`` for ``steps`` AdamW steps of ``batch`` samples.

    Returns the model (in train mode) and stats: ``losses`` (every step's batch loss),
    ``final_train_loss`` (mean of the last 20), ``heldout_loss`` (+ ``heldout_bpc`` for a
    char GPT, ``heldout_accuracy`` for a ViT), ``seconds`` (training only), ``eval_seconds``,
    ``data`` and ``heldout_data`` (what was used), and the settings."""
    check_spec(spec)
    for label, value in (("steps", steps), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, not {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, not {lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    warmup = min(100, max(1, steps // 10)) if warmup is None else max(1, warmup)

    from trainer.tasks import task_for_kind

    data = task_for_kind(spec.kind).pretraining_data(spec)
    if spec.kind == "gpt":
        ids, span = data["train"], spec.max_seq_len + 1
        if len(ids) <= span:
            raise ValueError(f"training text of {len(ids)} chars is shorter than a window of {span}")
        offsets = torch.arange(span)

        def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
            starts = torch.randint(0, len(ids) - span + 1, (batch,), generator=generator)
            windows = ids[starts[:, None] + offsets]
            return windows[:, :-1], windows[:, 1:]
    else:
        images, labels = data["train"]
        if spec.dtype == "bf16":
            images = images.to(torch.bfloat16)

        def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
            index = torch.randint(0, len(labels), (batch,), generator=generator)
            return images[index], labels[index]

    model = build_model(spec, seed)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup, schedule))

    losses: list[float] = []
    bar = _progress_bar() if progress else None
    task = bar.add_task(spec.name, total=steps, loss="-") if bar else None
    if bar:
        bar.start()
    start = time.perf_counter()
    try:
        for step in range(steps):
            x, y = next_batch(generator)
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"{spec.name}: loss became {value} at step {step}; lower --lr")
            losses.append(value)
            if bar and (step % 10 == 9 or step == steps - 1):
                recent = losses[-10:]
                bar.update(task, completed=step + 1, loss=f"{sum(recent) / len(recent):.3f}")
    finally:
        if bar:
            bar.stop()
    seconds = time.perf_counter() - start

    start = time.perf_counter()
    held = evaluate(model, *data["heldout"])
    tail = losses[-FINAL_LOSS_STEPS:]
    stats = {
        "model": spec.name, "steps": steps, "batch": batch, "lr": lr, "seed": seed, "schedule": schedule,
        "warmup": warmup, "weight_decay": weight_decay, "optimizer": "AdamW(betas=(0.9, 0.99)), grad clip 1.0",
        "n_params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "losses": losses, "final_train_loss": sum(tail) / len(tail),
        "heldout_loss": held["loss"], "eval_seconds": time.perf_counter() - start,
        "data": data["data"], "heldout_data": data["heldout_data"],
    }
    if spec.kind == "gpt":
        stats["heldout_bpc"] = held["loss"] / math.log(2)
        stats["final_train_bpc"] = stats["final_train_loss"] / math.log(2)
    else:
        stats["heldout_accuracy"] = held["accuracy"]
    return model, stats


def loss_curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """``[[last step of the chunk, mean batch loss of the chunk], ...]`` in about ``points`` chunks."""
    size = max(1, math.ceil(len(losses) / points))
    return [[min(i + size, len(losses)), round(sum(losses[i : i + size]) / len(losses[i : i + size]), 4)]
            for i in range(0, len(losses), size)]


def checkpoint_metadata(spec: ModelSpec, stats: dict, command: str) -> dict[str, str]:
    """The string metadata a pretrained checkpoint carries (see `trainer.checkpoint`)."""
    meta = {
        "format": "caff-pretrained-v1",
        "spec": spec.model_dump_json(),
        "command": command,
        "loss_curve": json.dumps(loss_curve(stats["losses"])),
    }
    for key in ("model", "seed", "steps", "batch", "lr", "schedule", "warmup", "weight_decay", "optimizer",
                "n_params", "threads", "torch", "data", "heldout_data"):
        meta[key] = str(stats[key])
    meta["seconds"] = f"{stats['seconds']:.1f}"
    for key in ("final_train_loss", "final_train_bpc", "heldout_loss", "heldout_bpc", "heldout_accuracy"):
        if key in stats:
            meta[key] = f"{stats[key]:.4f}"
    return meta
