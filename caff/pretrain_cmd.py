"""``caff pretrain``: pretrain zoo models on data the federated clients never see, and save them.

``caff pretrain char-gpt-xs,vit-tiny`` writes ``checkpoints/char-gpt-xs.safetensors`` and
``checkpoints/vit-tiny.safetensors`` with the settings of the committed checkpoints
(`trainer.pretrain.PRETRAIN_DEFAULTS`); ``--steps/--batch/--lr`` override them for every model.
See `trainer.pretrain` for the data and `trainer.checkpoint` for the file format.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.checkpoint import CHECKPOINT_DIR

DEFAULT_THREADS = 1


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_parser(subparsers) -> dict:
    p = subparsers.add_parser(
        "pretrain", help="pretrain zoo models (char GPTs on English fortunes, never Shakespeare; vit-tiny on "
                         "five Fashion-MNIST classes) and save safetensors checkpoints")
    p.add_argument("models", metavar="MODEL[,MODEL...]",
                   help="comma-separated zoo names or spec JSON files (kinds gpt with vocab 80, or vit)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default: per model)")
    p.add_argument("--batch", type=_positive_int, default=None, help="samples per step (default: per model)")
    p.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: per model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches (default 0)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after a linear warmup: cosine decay to lr/10 (default) or constant")
    p.add_argument("--threads", type=_positive_int, default=DEFAULT_THREADS,
                   help=f"torch CPU threads (default {DEFAULT_THREADS}: fastest on a shared 2-core machine)")
    p.add_argument("--out", default=None, help=f"folder for <model>.safetensors (default {CHECKPOINT_DIR})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return {"pretrain": run}


def settings(name: str, steps: int | None, batch: int | None, lr: float | None) -> dict:
    """Steps, batch and lr for model ``name``: the given ones, else its committed defaults."""
    from trainer.pretrain import FALLBACK_DEFAULTS, PRETRAIN_DEFAULTS

    chosen = dict(PRETRAIN_DEFAULTS.get(name, FALLBACK_DEFAULTS))
    for key, value in (("steps", steps), ("batch", batch), ("lr", lr)):
        if value is not None:
            chosen[key] = value
    return chosen


def command_line(model: str, chosen: dict, seed: int, schedule: str, threads: int, out: str | None) -> str:
    """The full ``caff pretrain`` command that reproduces one model's checkpoint."""
    command = (f"caff pretrain {model} --steps {chosen['steps']} --batch {chosen['batch']} --lr {chosen['lr']:g} "
               f"--seed {seed}")
    if schedule != "cosine":
        command += f" --schedule {schedule}"
    if threads != DEFAULT_THREADS:
        command += f" --threads {threads}"
    if out is not None and Path(out).resolve() != CHECKPOINT_DIR:
        command += f" --out {out}"
    return command


def run(args) -> int:
    import torch

    from costmodel.spec import load_spec
    from profiles import format_bytes
    from trainer.checkpoint import checkpoint_path, save_weights
    from trainer.pretrain import check_spec, checkpoint_metadata, pretrain

    names = [name.strip() for name in args.models.split(",")]
    if not all(names):
        raise ValueError(f"empty model name in {args.models!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"a model is named twice in {args.models!r}")
    specs = [load_spec(name) for name in names]  # every name checked before any training
    for spec in specs:
        check_spec(spec)
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError("two models share a spec name, so they would write the same file")
    out = Path(args.out) if args.out is not None else CHECKPOINT_DIR
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: not a folder")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name, spec in zip(names, specs):
            chosen = settings(spec.name, args.steps, args.batch, args.lr)
            command = command_line(name, chosen, args.seed, args.schedule, args.threads, args.out)
            model, stats = pretrain(spec, chosen["steps"], chosen["batch"], chosen["lr"], args.seed,
                                    progress=not args.quiet, schedule=args.schedule)
            path = save_weights(checkpoint_path(spec.name, out), model, checkpoint_metadata(spec, stats, command))
            if spec.kind == "gpt":
                held = f"held-out loss {stats['heldout_loss']:.4f} ({stats['heldout_bpc']:.3f} bits/char)"
                train = f"final train loss {stats['final_train_loss']:.4f} ({stats['final_train_bpc']:.3f} bits/char)"
            else:
                held = (f"held-out loss {stats['heldout_loss']:.4f}, accuracy "
                        f"{stats['heldout_accuracy']:.2%}")
                train = f"final train loss {stats['final_train_loss']:.4f}"
            print(f"{spec.name}: {stats['steps']} steps (batch {stats['batch']}, lr {stats['lr']:g}, "
                  f"seed {stats['seed']}) in {stats['seconds']:.1f} s; {train}; {held}; "
                  f"wrote {path} ({format_bytes(path.stat().st_size)})", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    return 0
