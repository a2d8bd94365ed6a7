"""Random training configurations over the ranges the cost model promises to cover (tests, benchmarks)."""

import random

from costmodel.mode import TrainMode
from costmodel.spec import ModelSpec

# a step of at most this many (batch x tokens x width x blocks) elements keeps each measurement fast
ELEMENT_BUDGET = 1_500_000


def random_config(rng: random.Random, recompute: bool = False, frozen: bool = False):
    """A random model, training mode, batch, sequence length and optimizer over the issue's ranges:
    1-12 blocks, width 32-512 with any head count dividing it, sequence 1-256, batch 1-64, every
    training mode, LoRA ranks 1-64, encoders with and without a padding mask; sizes are redrawn
    until one step fits ELEMENT_BUDGET. ``recompute``: a random non-empty subset of the trained
    blocks, if any, is recomputed; ``frozen``: frozen linear weights are held compact, in int8 or
    (fp32 models) bf16 (each drawn after everything else, so the rest is as without)."""
    while True:
        kind = rng.choice(["gpt", "encoder", "vit"])
        width = rng.choice([32, 48, 64, 96, 128, 192, 256, 384, 512])
        heads = rng.choice([h for h in range(1, 17) if width % h == 0])
        n_blocks = rng.randint(1, 12)
        batch = rng.choice([1, 2, 3, 4, 8, 16, 32, 64])
        seq = rng.choice([1, 2, 7, 16, 33, 64, 128, 256])
        fields = dict(kind=kind, n_blocks=n_blocks, d_model=width, n_heads=heads,
                      d_ff=rng.choice([width, 2 * width, 4 * width]), max_seq_len=256,
                      vocab_size=rng.choice([65, 80, 300]), n_classes=rng.choice([2, 10]),
                      norm=rng.choice(["pre", "post"]), activation=rng.choice(["gelu", "relu", "gelu_new"]),
                      attention=rng.choice(["matmul", "sdpa"]), dtype=rng.choice(["fp32", "fp32", "bf16"]),
                      dropout=rng.choice([0.0, 0.0, 0.1]),
                      tied_embeddings=kind == "gpt" and rng.random() < 0.25, fused_qkv=rng.random() < 0.3,
                      pad_token_id=rng.choice([None, 0]) if kind == "encoder" else None)
        if kind == "vit":
            patch = rng.choice([4, 7])
            fields.update(image_size=patch * rng.choice([1, 2, 4]), patch_size=patch, channels=rng.choice([1, 3]))
        spec = ModelSpec(**fields)
        tokens = spec.tokens_per_sample(seq)
        if batch * tokens * width * n_blocks * (1 + tokens // 64) <= ELEMENT_BUDGET:
            break
    rank = rng.choice([1, 2, 4, 8, 16, 32, 64])
    some = sorted(rng.sample(range(n_blocks), rng.randint(1, n_blocks)))
    text = rng.choice([
        "all", "head", f"last:{rng.randint(1, n_blocks)}", "blocks:" + ",".join(map(str, some)), f"lora:{rank}",
        "+".join(filter(None, ["blocks:" + ",".join(map(str, some[1:])) if some[1:] else "",
                               f"lora:{some[0]}={rank}"])),
    ])
    mode = TrainMode.parse(text, n_blocks)
    optimizer = rng.choice(["sgd", "momentum", "adam"])
    trained = sorted(mode.blocks | set(mode.lora))
    if recompute and trained:
        mode = mode.model_copy(update={"recompute": frozenset(rng.sample(trained, rng.randint(1, len(trained))))})
    if frozen:
        mode = mode.model_copy(update={"frozen": rng.choice(["int8", "bf16"] if spec.dtype == "fp32" else ["int8"])})
    return spec, mode, batch, seq, optimizer
