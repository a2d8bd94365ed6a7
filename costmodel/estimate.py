"""Analytic cost of one training step: per-layer FLOPs and bytes, totals and peak memory.

Layers are ``embed``, ``block.0`` .. ``block.{n-1}``, ``head`` and ``loss``; they form a
chain in a networkx graph (`layer_graph`). A layer runs with autograd only when one of
its ancestors (or itself) holds a trained parameter; below the lowest trained
parameter nothing is kept or back-propagated.

Peak of a steady-state step (optimizer state exists, gradients were set to None), in
bytes, with W all parameter bytes, O optimizer state, X the batch, and per layer l its
saved activations A_l, parameter gradients G_l and the worst points F_l (forward) and
B_l (backward) of its own timeline (see tape.py; for a block the mode recomputes, A_l is its
input and B_l covers the re-run of its forward)::

    forward at l:  W + O + X + sum_{j<l} A_j + F_l
    backward at l: W + O + X + sum_{j<l} A_j + sum_{j>l} G_j + B_l
    optimizer:     W + O + X + sum_j G_j + S        (S: the optimizer's largest temporary)
    peak = the largest of these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import networkx as nx

from costmodel.mode import TrainMode
from costmodel.modules import Block, Embedding, Head, Loss
from costmodel.spec import ModelSpec
from costmodel.tape import LayerCost, Sym, Tape

OPTIMIZERS = ("sgd", "momentum", "adam")


def optimizer_state_bytes(optimizer: str, trained_bytes: int, n_tensors: int) -> int:
    """Optimizer state in bytes: momentum one buffer, Adam two buffers and a float32 step per tensor."""
    return {"sgd": 0, "momentum": trained_bytes, "adam": 2 * trained_bytes + 4 * n_tensors}[optimizer]


def optimizer_temp_bytes(optimizer: str, largest_tensor_bytes: int) -> int:
    """Largest temporary of a (non-foreach) step: Adam's sqrt and division of one tensor."""
    return 2 * largest_tensor_bytes if optimizer == "adam" else 0


def layer_names(spec: ModelSpec) -> list[str]:
    return ["embed", *(f"block.{i}" for i in range(spec.n_blocks)), "head", "loss"]


def layer_graph(spec: ModelSpec) -> nx.DiGraph:
    """Data flow between layers; with tied embeddings the head's weight lives in ``embed``."""
    graph = nx.DiGraph()
    nx.add_path(graph, layer_names(spec))
    return graph


@functools.lru_cache(maxsize=256)
def layer_ancestors(spec: ModelSpec) -> tuple[tuple[str, frozenset[str]], ...]:
    """Layers in topological order, each with the layers it depends on."""
    graph = layer_graph(spec)
    return tuple((name, frozenset(nx.ancestors(graph, name))) for name in nx.topological_sort(graph))


def normalize_mode(spec: ModelSpec, mode: TrainMode) -> TrainMode:
    """Check block indices and compact weights; tied embeddings train whenever the head does (always)."""
    if bad := sorted(b for b in mode.blocks | set(mode.lora) if b >= spec.n_blocks):
        raise ValueError(f"block {bad[0]} out of range: {spec.name} has blocks 0..{spec.n_blocks - 1}")
    if mode.frozen == spec.dtype:
        raise ValueError(f"frozen:{mode.frozen} changes nothing: {spec.name} already holds its weights in {spec.dtype}")
    if spec.tied_embeddings and not mode.embeddings:
        return mode.model_copy(update={"embeddings": True})
    return mode


def layer_state(mode: TrainMode, name: str):
    """What a layer trains: 'full'/'frozen'/rank for blocks, True/False for embed, True for head."""
    if name.startswith("block."):
        return mode.block_state(int(name.split(".")[1]))
    return mode.embeddings if name == "embed" else name == "head"


def _trains(state) -> bool:
    return state not in (False, "frozen")


def batch_syms(spec: ModelSpec, batch: int, seq: int) -> tuple[Sym, Sym]:
    """The inputs (token ids or images) and targets of one batch."""
    if spec.kind == "vit":
        size = spec.image_size
        return Sym((batch, spec.channels, size, size), spec.dtype_bytes, False), Sym((batch,), 8, False)
    targets = (batch, seq) if spec.kind == "gpt" else (batch,)
    return Sym((batch, seq), 8, False), Sym(targets, 8, False)


@functools.lru_cache(maxsize=65536)
def layer_cost(spec: ModelSpec, name: str, state, input_requires_grad: bool, batch: int, seq: int,
               recompute: bool = False, compact: str | None = None, optimizer: str | None = None) -> LayerCost:
    """Cost of one layer in a given state, given whether its input requires grad, whether it is
    recomputed in backward, and how a block holds its frozen linear weights (`costmodel.compact`); with
    ``optimizer``, its state and step temporaries too (`with_optimizer`). Cached; the blocks, alike but
    for their names, share one costing per state, and one across ways of holding frozen weights where
    none of its linear weights is frozen."""
    if not name.startswith("block.") or state == "full":
        compact = None  # no frozen linear weight to hold compact
    if optimizer is not None:
        return with_optimizer(layer_cost(spec, name, state, input_requires_grad, batch, seq, recompute, compact),
                              optimizer)
    if name.startswith("block."):
        return _with(_layer_cost(spec, "block", state, input_requires_grad, batch, seq, recompute, compact),
                     name=name)
    return _layer_cost(spec, name, state, input_requires_grad, batch, seq, recompute, compact)


@functools.lru_cache(maxsize=4096)
def _layer_cost(spec: ModelSpec, name: str, state, input_requires_grad: bool, batch: int, seq: int,
                recompute: bool, compact: str | None) -> LayerCost:
    """`layer_cost` of ``name``: 'embed', 'head', 'loss' or 'block' (any block)."""
    tokens = spec.tokens_per_sample(seq)
    inputs, targets = batch_syms(spec, batch, tokens)
    hidden = Sym((batch, tokens, spec.d_model), spec.dtype_bytes, input_requires_grad)
    grad_enabled = input_requires_grad or _trains(state)
    tape = Tape(name, spec.dtype_bytes, grad_enabled, compact if name == "block" else None)
    external = {inputs.storage, targets.storage}
    if name == "embed":
        layer_in, out = [inputs], Embedding.cost(spec, tape, inputs, bool(state))
    elif name == "head":
        layer_in, out = [hidden], Head.cost(spec, tape, hidden, spec.tied_embeddings)
    elif name == "loss":
        vocab = spec.vocab_size if spec.kind == "gpt" else spec.n_classes
        rows = batch * tokens if spec.kind == "gpt" else batch
        logits = Sym((rows, vocab), spec.dtype_bytes, True)
        layer_in, out = [logits, targets], Loss.cost(spec, tape, logits, targets)
    else:
        layer_in, out = [hidden], Block.cost(spec, tape, hidden, state)
    return tape.finish(layer_in, [out], external, recompute)


def _with(cost: LayerCost, **changes) -> LayerCost:
    """A copy of ``cost`` with ``changes``: `dataclasses.replace` less its look at every field, ~2.5x
    faster (a fleet plan makes thousands)."""
    return LayerCost(**{**cost.__dict__, **changes})


def clear_layer_costs() -> None:
    """Forget every layer costing computed so far in this process (a cold start)."""
    layer_cost.cache_clear()
    _layer_cost.cache_clear()


@dataclass
class CostReport:
    """Per-layer costs, totals and peak memory of one training step (FLOPs; bytes)."""

    model: str
    train: str
    batch: int
    seq: int
    optimizer: str
    dtype: str
    layers: list[LayerCost]
    input_bytes: int
    buffer_bytes: int
    optimizer_bytes: int
    optimizer_temp_bytes: int
    peak_bytes: int
    peak_phase: str
    totals: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        keys = ("fwd_flops", "bwd_flops", "bwd_input_flops", "bwd_weight_flops", "recompute_flops",
                "elementwise_flops", "activation_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "upload_bytes")
        layers = [{"name": c.name, **{k: getattr(c, k) for k in keys}} for c in self.layers]
        return {"model": self.model, "train": self.train, "batch": self.batch, "seq": self.seq,
                "optimizer": self.optimizer, "dtype": self.dtype, "layers": layers,
                "total": {**self.totals, "peak_bytes": self.peak_bytes}, "peak_phase": self.peak_phase}


def estimate(spec: ModelSpec, mode: TrainMode, batch: int = 16, seq: int | None = None,
             optimizer: str = "sgd") -> CostReport:
    """Analytic cost of one training step of ``spec`` in ``mode``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} ({', '.join(OPTIMIZERS)})")
    mode = normalize_mode(spec, mode)
    tokens = spec.tokens_per_sample(seq)
    trained = {name for name in layer_names(spec) if _trains(layer_state(mode, name))}
    layers = []
    for name, ancestors in layer_ancestors(spec):
        input_grad = not trained.isdisjoint(ancestors)
        recompute = name in {f"block.{b}" for b in mode.recompute}
        layers.append(layer_cost(spec, name, layer_state(mode, name), input_grad, batch, tokens, recompute,
                                 mode.frozen, optimizer))
    return _report(spec, mode, batch, tokens, optimizer, layers)


def with_optimizer(cost: LayerCost, optimizer: str) -> LayerCost:
    return _with(cost, optimizer_bytes=optimizer_state_bytes(optimizer, cost.trained_param_bytes, cost.trained_tensors),
                 step_temp_bytes=optimizer_temp_bytes(optimizer, cost.largest_trained_tensor_bytes))


def _report(spec, mode, batch, tokens, optimizer, layers: list[LayerCost]) -> CostReport:
    inputs, targets = batch_syms(spec, batch, tokens)
    input_bytes = inputs.nbytes + targets.nbytes
    buffer_bytes = sum(c.buffer_bytes for c in layers)
    weights = sum(c.param_bytes for c in layers)
    state_bytes = sum(c.optimizer_bytes for c in layers)
    base = weights + state_bytes + input_bytes + buffer_bytes
    grads = sum(c.grad_bytes for c in layers)
    temp = max(c.step_temp_bytes for c in layers)
    phases = {"optimizer step": base + grads + temp}
    below = 0
    above = grads
    for cost in layers:
        above -= cost.grad_bytes
        phases[f"forward {cost.name}"] = base + below + cost.fwd_peak_bytes
        if cost.in_backward:
            phases[f"backward {cost.name}"] = base + below + above + cost.bwd_peak_bytes
        below += cost.activation_bytes - cost.external_saved_bytes
    phase = max(phases, key=phases.get)
    totals = {k: sum(getattr(c, k) for c in layers) for k in
              ("fwd_flops", "bwd_flops", "bwd_input_flops", "bwd_weight_flops", "recompute_flops",
               "elementwise_flops", "activation_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "upload_bytes")}
    return CostReport(spec.name, str(mode), batch, tokens, optimizer, spec.dtype, layers, input_bytes,
                      buffer_bytes, state_bytes, temp, phases[phase], phase, totals)
