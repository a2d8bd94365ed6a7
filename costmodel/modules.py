"""The torch modules built from a `ModelSpec`, each with its analytic cost beside it.

Every module has a ``forward`` and a static ``cost`` that replays the same ops on a
`Tape` (see tape.py); the two must change together. ``state`` of a block is
``"full"``, ``"frozen"`` or a LoRA rank (int). LoRA itself is injected by peft
(`costmodel.build.inject_lora`), whose Linear the tape mirrors in `Tape.lora_linear`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from costmodel.spec import ModelSpec
from costmodel.tape import Sym, Tape

IGNORED = -100  # the target id cross-entropy skips (torch's and transformers' default)


def lora_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The linears LoRA adapts in a block: every attention and MLP projection."""
    qkv = ("attn.qkv",) if spec.fused_qkv else ("attn.q", "attn.k", "attn.v")
    return (*qkv, "attn.o", "mlp.fc", "mlp.proj")


def _reshape(tape: Tape, x: Sym, shape: tuple[int, ...], is_view: bool) -> Sym:
    """``reshape``: a view when the strides allow it, else a copy (a new storage)."""
    return x.view(*shape) if is_view else tape.copy(x, *shape)


def _linear_cost(tape: Tape, x: Sym, d_out: int, state) -> Sym:
    if isinstance(state, int):
        return tape.lora_linear(x, d_out, state)
    return tape.linear(x, d_out, trained=state == "full")


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, causal: bool):
        super().__init__()
        d = spec.d_model
        if spec.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.n_heads, self.causal, self.kernel, self.kv_cache = spec.n_heads, causal, spec.attention, spec.kv_cache
        self.dropout, self.pad_token_id = spec.dropout, spec.pad_token_id
        if causal and spec.attention == "matmul":
            # on the CPU even when the model is built on the meta device (it is not in a state dict)
            future = torch.ones(spec.max_seq_len, spec.max_seq_len, dtype=torch.bool, device="cpu").triu(1)
            self.register_buffer("future", future, persistent=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``ids``: the (batch, seq) token ids whose padding is masked as keys; None masks nothing."""
        batch, seq, width = x.shape
        heads = lambda t: t.view(batch, seq, self.n_heads, width // self.n_heads).transpose(1, 2)  # noqa: E731
        if hasattr(self, "qkv"):
            q, k, v = map(heads, self.qkv(x).split(width, dim=2))
        else:
            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.kv_cache:  # as transformers' DynamicCache.update: torch.cat onto an empty cache copies
            k, v = (t.clone(memory_format=torch.contiguous_format) for t in (k, v))
        y = self.attend(q, k, v, ids)
        return self.o(y.transpose(1, 2).reshape(batch, seq, width))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Attention of (batch, heads, seq, head_dim) queries, keys and values."""
        if self.kernel == "sdpa":
            mask = None if ids is None else self.padding_bias(ids, q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        seq = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if self.causal:
            att = att.masked_fill(self.future[:seq, :seq], float("-inf"))
        if ids is not None:
            att = att + self.padding_bias(ids, att.dtype)
        att = F.softmax(att, dim=-1)  # one op per line: each rebinding frees the previous tensor
        att = F.dropout(att, self.dropout, self.training)
        return att @ v

    def padding_bias(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, 1, seq) additive mask of the keys: 0 on tokens, the dtype's lowest value on
        padding (BERT's; finite, so an all-padding row attends uniformly rather than giving NaN)."""
        batch, seq = ids.shape
        padded = (ids == self.pad_token_id).view(batch, 1, 1, seq)
        bias = torch.zeros(batch, 1, 1, seq, dtype=dtype, device=ids.device)
        return bias.masked_fill_(padded, torch.finfo(dtype).min)

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, x: Sym, state) -> Sym:
        batch, seq, width = x.shape
        heads, head_dim = spec.n_heads, spec.head_dim
        if spec.kind == "gpt" and spec.attention == "matmul":
            tape.buffers(spec.max_seq_len ** 2)  # the causal mask, one bool per position pair
        if spec.fused_qkv:
            qkv = _linear_cost(tape, x, 3 * width, state)
            q, k, v = (t.view(batch, heads, seq, head_dim) for t in tape.split(qkv, 3))
        else:
            q, k, v = (_linear_cost(tape, x, width, state).view(batch, heads, seq, head_dim) for _ in range(3))
        if spec.kv_cache:  # copies of k and v; q stays a view: what saves q keeps the fused projection whole
            k, v = (tape.copy(t, *t.shape) for t in (k, v))
            q = replace(q, base=qkv) if spec.fused_qkv else q
        masked = spec.pad_token_id is not None
        if spec.attention == "sdpa":
            y = tape.sdpa(q, k, v, tape.padding_bias(batch, seq) if masked else None)
            tape.hold(q, k, v)  # attend()'s arguments
            # CPU flash attention returns heads-last memory: back to width is a view
            y = y.view(batch, seq, width)
        else:
            folds = batch == 1 or heads == 1 or seq == 1  # (B, H) folds into one batch dim as a view
            q3 = _reshape(tape, q, (batch * heads, seq, head_dim), folds)
            kt3 = _reshape(tape, k, (batch * heads, head_dim, seq), folds)
            scores = tape.bmm(q3, kt3, (batch * heads, seq, seq), head_dim)
            scores = tape.pointwise(scores, 1)  # * 1/sqrt(d)
            if spec.kind == "gpt":
                scores = tape.pointwise(scores, 1)  # masked_fill with a buffer slice
            if masked:
                scores = tape.add(scores, tape.padding_bias(batch, seq))
            probs = tape.dropout(tape.softmax(scores), spec.dropout)
            v3 = _reshape(tape, v, (batch * heads, seq, head_dim), folds)
            y = tape.bmm(probs, v3, (batch * heads, seq, head_dim), seq)
            tape.hold(q, k, v)  # attend()'s arguments
            y = _reshape(tape, y, (batch, seq, width), seq == 1 or heads == 1)
        out = _linear_cost(tape, y, width, state)
        tape.hold(x)
        return out


class GeluTanhFormula(nn.Module):
    """GPT-2's ``gelu_new``, written out as transformers writes it (so it saves what theirs saves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.fc = nn.Linear(spec.d_model, spec.d_ff)
        self.proj = nn.Linear(spec.d_ff, spec.d_model)
        self.act = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_new": GeluTanhFormula}[spec.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, x: Sym, state) -> Sym:
        hidden = tape.activation(_linear_cost(tape, x, spec.d_ff, state), spec.activation)
        out = _linear_cost(tape, hidden, spec.d_model, state)
        tape.hold(x)
        return out


class Block(nn.Module):
    """Attention and MLP with residuals; LayerNorm before each (pre) or after each residual (post).

    With ``recompute`` set (`costmodel.build.apply_mode`), a step that needs gradients runs it under
    non-reentrant ``torch.utils.checkpoint``: it keeps only its input and re-runs in backward."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.attn = Attention(spec, causal=spec.kind == "gpt")
        self.ln2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.mlp = MLP(spec)
        self.pre_norm, self.dropout = spec.norm == "pre", spec.dropout
        self.recompute = False

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``ids``: the token ids whose padding attention masks (see `Attention.forward`)."""
        if self.recompute and torch.is_grad_enabled():
            # ids by closure: checkpoint keeps (and saved-tensor hooks see) only x
            return checkpoint(lambda t: self._forward(t, ids), x, use_reentrant=False)
        return self._forward(x, ids)

    def _forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.pre_norm:
            x = x + drop(self.attn(self.ln1(x), ids))
            return x + drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + drop(self.attn(x, ids)))
        return self.ln2(x + drop(self.mlp(x)))

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, x: Sym, state) -> Sym:
        norms_train = state == "full"
        drop = lambda t: tape.dropout(t, spec.dropout)  # noqa: E731
        block_input = x
        if spec.norm == "pre":
            x = tape.add(x, drop(Attention.cost(spec, tape, tape.layer_norm(x, norms_train), state)))
            out = tape.add(x, drop(MLP.cost(spec, tape, tape.layer_norm(x, norms_train), state)))
        else:
            x = tape.layer_norm(tape.add(x, drop(Attention.cost(spec, tape, x, state))), norms_train)
            out = tape.layer_norm(tape.add(x, drop(MLP.cost(spec, tape, x, state))), norms_train)
        tape.hold(block_input)
        return out


class Embedding(nn.Module):
    """Token (+ learned position, + token-type and LayerNorm for encoders) or ViT patch embedding."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d = spec.d_model
        self.kind, self.dropout, self.position_lookup = spec.kind, spec.dropout, spec.position_lookup
        if spec.kind == "vit":
            self.patch = nn.Conv2d(spec.channels, d, spec.patch_size, stride=spec.patch_size)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, spec.n_patches + 1, d) * 0.02)
        else:
            self.tok = nn.Embedding(spec.vocab_size, d)
            self.pos = nn.Parameter(torch.randn(spec.max_seq_len, d) * 0.02)
        if spec.kind == "encoder":
            self.token_type = nn.Parameter(torch.randn(spec.type_vocab_size, d) * 0.02)
            self.norm = nn.LayerNorm(d, eps=spec.layer_norm_eps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            patches = self.patch(inputs).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(inputs), -1, -1), patches], dim=1) + self.pos
        else:
            x = self.tok(inputs) + self._positions(inputs.shape[1])
        if self.kind == "encoder":
            x = self.norm(x + self.token_type[0])
        return F.dropout(x, self.dropout, self.training)

    def _positions(self, seq: int) -> torch.Tensor:
        """Position embeddings of the first ``seq`` positions: a slice, or a lookup of (1, seq) int64 ids."""
        if self.position_lookup:
            return F.embedding(torch.arange(seq, device=self.pos.device).unsqueeze(0), self.pos)
        return self.pos[:seq]

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, inputs: Sym, trained: bool) -> Sym:
        d = spec.d_model
        if spec.kind == "vit":
            patches = tape.conv_patches(inputs, d, spec.patch_size, trained)
            joined = tape.add_param(patches.view(inputs.shape[0], spec.n_patches + 1, d), d, trained)  # cat
            x = tape.add_param(joined, (spec.n_patches + 1) * d, trained)
        else:
            tokens = tape.embedding(inputs, spec.vocab_size, d, trained, grad_exists=spec.tied_embeddings)
            if spec.position_lookup:
                positions = tape.embedding(tape.tensor(1, inputs.shape[1], itemsize=8), spec.max_seq_len, d, trained)
                x = tape.add(tokens, positions)
            else:
                x = tape.add_param(tokens, spec.max_seq_len * d, trained)
        if spec.kind == "encoder":
            x = tape.layer_norm(tape.add_param(x, spec.type_vocab_size * d, trained), trained)
        return tape.dropout(x, spec.dropout)


class Head(nn.Module):
    """Final LayerNorm (pre-norm models), then the LM head, or pooler and classifier on the first token."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d = spec.d_model
        self.kind = spec.kind
        self.norm = nn.LayerNorm(d, eps=spec.layer_norm_eps) if spec.norm == "pre" else nn.Identity()
        if spec.kind == "gpt":
            self.out = nn.Linear(d, spec.vocab_size, bias=False)
        else:
            if spec.kind == "encoder":
                self.pooler = nn.Linear(d, d)
            self.out = nn.Linear(d, spec.n_classes)
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.kind == "gpt":
            return self.out(x)
        x = x[:, 0]
        if self.kind == "encoder":
            x = F.dropout(torch.tanh(self.pooler(x)), self.dropout, self.training)
        return self.out(x)

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, x: Sym, tied: bool) -> Sym:
        """Logits of the head; with tied embeddings the LM head's weight belongs to the embedding."""
        if spec.norm == "pre":
            x = tape.layer_norm(x, trained=True)
        if spec.kind == "gpt":
            return tape.linear(x, spec.vocab_size, trained=True, bias=False, owns_weight=not tied)
        first = Sym((x.shape[0], x.shape[-1]), x.itemsize, x.requires_grad, x.storage, x.storage_bytes)
        if spec.kind == "encoder":
            first = tape.dropout(tape.activation(tape.linear(first, spec.d_model, trained=True), "tanh"), spec.dropout)
        return tape.linear(first, spec.n_classes, trained=True)


class Loss(nn.Module):
    """Mean cross-entropy over every position (gpt) or over samples (classifiers). With ``shift_labels``
    the targets are shifted left by one first, the last position ignored (transformers' causal-LM loss,
    given the inputs as labels)."""

    def __init__(self, shift_labels: bool = False):
        super().__init__()
        self.shift_labels = shift_labels

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.shift_labels:
            targets = F.pad(targets, (0, 1), value=IGNORED)[..., 1:].contiguous()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORED)

    @staticmethod
    def cost(spec: ModelSpec, tape: Tape, logits: Sym, targets: Sym) -> Sym:
        flat = logits.view(logits.numel // logits.shape[-1], logits.shape[-1])
        if spec.shift_labels:  # the padded copy; dropping its first column copies again unless batch is 1
            batch, seq = targets.shape
            padded = tape.copy(targets, batch, seq + 1, itemsize=8)
            targets = padded.view(batch, seq) if batch == 1 else tape.copy(padded, batch, seq, itemsize=8)
        loss = tape.cross_entropy(flat, targets)
        tape.hold(logits)
        return loss


class TinyTransformer(nn.Module):
    """Embedding, blocks, head and loss; blocks below ``grad_from`` run under ``torch.no_grad()``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = Embedding(spec)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_blocks))
        self.head = Head(spec)
        self.loss = Loss(spec.shift_labels)
        if spec.tied_embeddings:
            self.head.out.weight = self.embed.tok.weight
        self.grad_from = 0  # index of the first block that needs autograd; set by costmodel.apply_mode
        self.apply(_init_weights)
        self.to(torch.bfloat16 if spec.dtype == "bf16" else torch.float32)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Output of the last block; with a ``pad_token_id``, every block masks the padded keys."""
        ids = inputs if self.spec.pad_token_id is not None else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.grad_from < 0):
            x = self.embed(inputs)
        for index, block in enumerate(self.blocks):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.grad_from):
                x = block(x, ids)
        return x

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch (written so that no activation outlives its last use)."""
        return self.loss(self.head(self.features(inputs)), targets)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
