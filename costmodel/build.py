"""Build a model from a spec, make it train what a `TrainMode` says, and make its optimizer."""

from __future__ import annotations

import torch
from torch import nn

from costmodel.compact import compact_frozen_linears
from costmodel.estimate import normalize_mode
from costmodel.mode import TrainMode
from costmodel.modules import TinyTransformer, lora_targets
from costmodel.spec import ModelSpec


def build_model(spec: ModelSpec, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(spec)


#: LoRA's scale alpha / rank unless a run chooses another (alpha = 2 x rank)
LORA_SCALE = 2.0


def inject_lora(model: nn.Module, targets: dict[str, int], scale: float = LORA_SCALE) -> None:
    """Inject peft LoRA adapters: module name -> rank, each with alpha = ``scale`` x rank (so every
    adapter's update B A is multiplied by ``scale``), no dropout."""
    if not targets:
        return
    from peft import LoraConfig, inject_adapter_in_model

    rank = max(targets.values())
    config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=0.0, target_modules=list(targets),
                        rank_pattern={f"^{name}$": r for name, r in targets.items()},
                        alpha_pattern={f"^{name}$": scale * r for name, r in targets.items()})
    inject_adapter_in_model(config, model)


def apply_mode(model: TinyTransformer, mode: TrainMode,
               compact: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
               lora_scale: float = LORA_SCALE) -> TinyTransformer:
    """Freeze what ``mode`` does not train, inject its LoRA adapters (alpha = ``lora_scale`` x rank), make
    its frozen linears compact (``frozen:bf16|int8``: every linear of a block that does not train fully,
    LoRA bases included; ``compact``: module name -> (weight, scale) of those the server sent compact,
    `costmodel.compact.received_compact`), mark the blocks it recomputes, and set where autograd starts."""
    spec = model.spec
    mode = normalize_mode(spec, mode)
    inject_lora(model, {f"blocks.{b}.{t}": r for b, r in mode.lora.items() for t in lora_targets(spec)}, lora_scale)
    model.requires_grad_(False)
    for block in mode.blocks:
        model.blocks[block].requires_grad_(True)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    for index, block in enumerate(model.blocks):
        block.recompute = index in mode.recompute
        if mode.frozen and index not in mode.blocks:
            prefix = f"blocks.{index}."
            received = {k.removeprefix(prefix): v for k, v in (compact or {}).items() if k.startswith(prefix)}
            compact_frozen_linears(block, lora_targets(spec), mode.frozen, received)
    model.head.requires_grad_(True)
    if mode.embeddings:
        model.embed.requires_grad_(True)
    first = min(mode.blocks | set(mode.lora), default=spec.n_blocks)
    model.grad_from = -1 if mode.embeddings else first
    return model


def make_optimizer(params, optimizer: str, lr: float = 1e-3) -> torch.optim.Optimizer:
    """The optimizers the cost model knows, in their per-tensor (not foreach) form, so that a
    step's temporaries are one tensor's size, not the whole model's."""
    params = [p for p in params if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=False)
    if optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, foreach=False)
    raise ValueError(f"unknown optimizer {optimizer!r} (sgd, momentum, adam)")


def make_batch(spec: ModelSpec, batch: int, seq: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of the right shapes: (token ids or images, targets)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = spec.tokens_per_sample(seq)
    if spec.kind == "vit":
        size = spec.image_size
        dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
        images = torch.randn(batch, spec.channels, size, size, generator=generator).to(dtype)
        return images, torch.randint(0, spec.n_classes, (batch,), generator=generator)
    ids = torch.randint(0, spec.vocab_size, (batch, tokens), generator=generator)
    if spec.kind == "gpt":
        return ids, torch.randint(0, spec.vocab_size, (batch, tokens), generator=generator)
    return ids, torch.randint(0, spec.n_classes, (batch,), generator=generator)
