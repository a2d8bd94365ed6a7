"""Training modes: what a device trains.

Text forms (parsed by `TrainMode.parse`, printed by `str`):

- ``all``: every parameter, embeddings included;
- ``head``: only what follows the last block (final norm, pooler, head);
- ``last:K``: the last K blocks and the head;
- ``blocks:i,j,...``: any set of blocks (0-based) and the head;
- ``lora:R``: LoRA of rank R on every attention and MLP linear of every block, base frozen, head trained;
- mixed, joined by ``+``: ``blocks:4,5+lora:0=8,1=8,2=4`` (full blocks 4 and 5, LoRA on 0-2), and
  ``emb`` to train the embeddings too;
- ``recompute:i,j,...``: trained blocks (full or LoRA) that keep only their input in the forward pass
  and re-run their forward during backward (activation checkpointing), e.g. ``blocks:2,3+recompute:2``;
- ``frozen:bf16`` or ``frozen:int8``: the linear weights no step trains (every linear of a frozen block,
  and the frozen base weight under each LoRA adapter) are held compact, in bf16 or in int8 with one
  scale (in the model's dtype) per output channel, and dequantized to the model's dtype inside each forward
  (`costmodel.compact`); biases, norms, embeddings and the head keep the model's dtype.
  E.g. ``blocks:3+frozen:int8``, ``lora:8+frozen:int8`` (QLoRA-like).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class TrainMode(BaseModel):
    """Which blocks train fully, which carry LoRA (block -> rank), which of those recompute their
    activations in backward, whether embeddings train, and how frozen linear weights are held
    (None: in the model's dtype).

    The head (final norm, pooler, classifier or LM head) always trains.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: frozenset[int] = frozenset()
    lora: dict[int, int] = {}
    recompute: frozenset[int] = frozenset()
    embeddings: bool = False
    frozen: Literal["bf16", "int8"] | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainMode":
        if any(b < 0 for b in self.blocks) or any(b < 0 for b in self.lora):
            raise ValueError("block indices must be >= 0")
        if overlap := self.blocks & set(self.lora):
            raise ValueError(f"blocks {sorted(overlap)} are both fully trained and LoRA")
        if any(r < 1 for r in self.lora.values()):
            raise ValueError("LoRA ranks must be >= 1")
        if untrained := sorted(self.recompute - self.blocks - set(self.lora)):
            raise ValueError(f"block {untrained[0]} is recomputed but not trained: recompute only blocks "
                             "that blocks: or lora: trains")
        return self

    def __hash__(self) -> int:
        return hash((self.blocks, tuple(sorted(self.lora.items())), self.recompute, self.embeddings, self.frozen))

    @classmethod
    def parse(cls, text: str, n_blocks: int) -> "TrainMode":
        """Parse a mode for a model of ``n_blocks`` blocks; ValueError with a one-line reason."""
        blocks: set[int] = set()
        lora: dict[int, int] = {}
        recompute: set[int] = set()
        embeddings = False
        frozen = None
        for part in text.strip().split("+"):
            kind, _, arg = part.strip().partition(":")
            try:
                if kind == "all" and not arg:
                    blocks |= set(range(n_blocks))
                    embeddings = True
                elif kind == "head" and not arg:
                    pass
                elif kind == "emb" and not arg:
                    embeddings = True
                elif kind == "last":
                    k = int(arg)
                    if not 0 <= k <= n_blocks:
                        raise ValueError(f"last:{k} needs 0 <= K <= {n_blocks}")
                    blocks |= set(range(n_blocks - k, n_blocks))
                elif kind == "blocks":
                    blocks |= {int(b) for b in arg.split(",") if b.strip()}
                elif kind == "recompute":
                    recompute |= {int(b) for b in arg.split(",") if b.strip()}
                elif kind == "frozen" and arg in ("bf16", "int8"):
                    frozen = arg
                elif kind == "frozen":
                    raise ValueError(f"frozen weights are held as bf16 or int8, not {arg!r}")
                elif kind == "lora" and "=" not in arg:
                    lora.update({b: int(arg) for b in range(n_blocks)})
                elif kind == "lora":
                    for item in arg.split(","):
                        block, _, rank = item.partition("=")
                        lora[int(block)] = int(rank)
                else:
                    raise ValueError(f"unknown training mode {part!r} (all, head, last:K, blocks:i,j, lora:R, emb, recompute:i,j, frozen:bf16|int8)")
            except ValueError as exc:
                if "invalid literal" in str(exc):
                    raise ValueError(f"bad number in training mode {part!r}") from None
                raise
        if out_of_range := sorted(b for b in blocks | set(lora) | recompute if not 0 <= b < n_blocks):
            raise ValueError(f"block {out_of_range[0]} out of range: the model has blocks 0..{n_blocks - 1}")
        for b in blocks:
            lora.pop(b, None)
        try:
            return cls(blocks=frozenset(blocks), lora=lora, recompute=frozenset(recompute), embeddings=embeddings,
                       frozen=frozen)
        except ValidationError as exc:  # one line: the validator's own reason
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    def __str__(self) -> str:
        parts = []
        if self.embeddings:
            parts.append("emb")
        if self.blocks:
            parts.append("blocks:" + ",".join(map(str, sorted(self.blocks))))
        if self.lora:
            parts.append("lora:" + ",".join(f"{b}={r}" for b, r in sorted(self.lora.items())))
        if self.recompute:
            parts.append("recompute:" + ",".join(map(str, sorted(self.recompute))))
        text = "+".join(parts) or "head"
        return f"{text}+frozen:{self.frozen}" if self.frozen else text

    def block_state(self, block: int) -> str | int:
        """'full', 'frozen', or the LoRA rank of a block."""
        if block in self.blocks:
            return "full"
        return self.lora.get(block, "frozen")
