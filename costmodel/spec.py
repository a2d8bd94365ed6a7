"""Model specs for tiny Transformers and the zoo of named ones.

A `ModelSpec` is everything the cost model and the builder need: three kinds
share one block (multi-head attention + MLP, residuals, LayerNorm pre or post):

- ``gpt``: decoder-only causal LM (token + position embeddings, final norm, LM head).
- ``encoder``: BERT-style classifier (word + position + token-type embeddings with
  LayerNorm, post-norm blocks, tanh pooler on the first token, linear classifier);
  with a ``pad_token_id``, attention ignores padded keys, as BERT's attention mask does.
- ``vit``: ViT classifier (conv patch embedding, class token, position embedding,
  final norm, linear head on the class token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from profiles import one_line_validation_error, read_json_object

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


class ModelSpec(BaseModel):
    """Shape of a tiny Transformer. Sizes are counts, not bytes; types are strict (``"64"`` or ``true``
    for a count is refused, not converted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = "custom"
    kind: Literal["gpt", "encoder", "vit"]
    n_blocks: int = Field(ge=1, le=256)
    d_model: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    d_ff: int = Field(ge=1)
    max_seq_len: int = Field(default=256, ge=1, description="positions (gpt, encoder)")
    vocab_size: int = Field(default=65, ge=1, description="tokens (gpt, encoder)")
    n_classes: int = Field(default=10, ge=1, description="labels (encoder, vit)")
    image_size: int = Field(default=28, ge=1, description="pixels per side (vit)")
    patch_size: int = Field(default=7, ge=1, description="pixels per patch side (vit)")
    channels: int = Field(default=1, ge=1, description="image channels (vit)")
    type_vocab_size: int = Field(default=2, ge=1, description="token types (encoder)")
    norm: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "relu", "gelu_new"] = "gelu"
    attention: Literal["matmul", "sdpa"] = "matmul"
    dtype: Literal["fp32", "bf16"] = "fp32"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tied_embeddings: bool = False
    fused_qkv: bool = Field(default=False, description="one query-key-value projection (GPT-2's c_attn)")
    kv_cache: bool = Field(default=False, description="keys and values pass through a key-value cache in training "
                           "too, as in transformers' GPT-2 with use_cache (its default): contiguous copies (gpt)")
    position_lookup: bool = Field(default=False, description="positions by an embedding lookup of int64 position "
                                  "ids, which it saves when trained, as in transformers' GPT-2 (gpt)")
    shift_labels: bool = Field(default=False, description="the loss shifts its targets left by one itself, "
                               "given the inputs, as transformers' causal-LM loss (gpt)")
    layer_norm_eps: float = Field(default=1e-5, gt=0)
    pad_token_id: int | None = Field(default=None, ge=0,
                                     description="token id whose positions attention ignores as keys (encoder)")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if self.tied_embeddings and self.kind != "gpt":
            raise ValueError("tied_embeddings applies to kind 'gpt' only")
        for flag in ("kv_cache", "position_lookup", "shift_labels"):
            if getattr(self, flag) and self.kind != "gpt":
                raise ValueError(f"{flag} applies to kind 'gpt' only")
        if self.pad_token_id is not None and self.kind != "encoder":
            raise ValueError("pad_token_id applies to kind 'encoder' only")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} outside vocab_size={self.vocab_size}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def tokens_per_sample(self, seq_len: int | None) -> int:
        """Sequence length the blocks see: tokens for text, patches + class token for ViT."""
        if self.kind == "vit":
            return self.n_patches + 1
        seq = self.max_seq_len if seq_len is None else seq_len
        if not 1 <= seq <= self.max_seq_len:
            raise ValueError(f"sequence length {seq} outside 1..{self.max_seq_len}")
        return seq


def _char_gpt(name: str, n_blocks: int, d_model: int, n_heads: int) -> ModelSpec:
    return ModelSpec(name=name, kind="gpt", n_blocks=n_blocks, d_model=d_model, n_heads=n_heads,
                     d_ff=4 * d_model, max_seq_len=128, vocab_size=80)


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _char_gpt("char-gpt-xs", 4, 64, 2),
        _char_gpt("char-gpt-s", 6, 128, 4),
        _char_gpt("char-gpt-m", 8, 192, 6),
        _char_gpt("char-gpt-l", 12, 256, 8),
        ModelSpec(name="vit-tiny", kind="vit", n_blocks=6, d_model=96, n_heads=3, d_ff=384,
                  image_size=28, patch_size=7, channels=1, n_classes=10),
        ModelSpec(name="minilm-l6", kind="encoder", n_blocks=6, d_model=384, n_heads=12, d_ff=1536,
                  max_seq_len=512, vocab_size=30522, n_classes=40, norm="post",
                  attention="sdpa", layer_norm_eps=1e-12, pad_token_id=0),
    ]
}


def load_spec(model: str) -> ModelSpec:
    """A zoo name, a spec JSON file, or a Hugging Face model directory (with config.json)."""
    if model in ZOO:
        return ZOO[model]
    path = Path(model)
    if path.is_dir():
        from costmodel.hf import spec_from_hf_config

        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"{model}: directory has no config.json")
        try:
            return spec_from_hf_config(read_json_object(config, "config"), name=path.name)
        except ValidationError as exc:
            raise ValueError(f"{config}: {one_line_validation_error(exc)}") from None
    if path.is_file():
        try:
            return ModelSpec.model_validate(read_json_object(path, "model spec"))
        except ValidationError as exc:
            raise ValueError(f"{path}: {one_line_validation_error(exc)}") from None
    raise ValueError(f"unknown model {model!r}: not a zoo name ({', '.join(ZOO)}), spec file or model directory")
