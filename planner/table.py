"""Every (layer, state, input-requires-grad) option of a model, and each planned quantity as a linear form.

A plan gives each layer one state (``layer_state``: 'full', 'frozen' or a LoRA rank for blocks,
or, with the recompute menu, `Recomputed` ('full' or a rank) for a trained block that re-runs its
forward in backward; the embeddings' fixed flag; True for the head; False for the loss). A table
holds its frozen linear weights one way (``frozen``: None, 'bf16' or 'int8', one choice per plan,
as in `TrainMode`); the fleet planner makes one table per choice of its menu. A layer's
cost depends on its state and on whether its input requires grad, which holds iff an ancestor in
`layer_graph` trains (`layer_ancestors`).
An *option* is one such (layer, state, flag) triple; a plan selects exactly one option per layer,
so every quantity of `costmodel.estimate` is a sum over layers of a number per selected option:

- FLOPs per step ``fwd_flops + bwd_flops``, upload bytes (which also bound the received bytes the
  process keeps, the old values of what it trains: `costmodel.process.kept_bytes`), trained parameter
  bytes, the objective;
- the weights' bytes (``weight_bytes``), which the allocator's slack leaves out (`costmodel.process`);
- each memory phase of estimate's docstring, with ``W + O`` and buffers split per layer as ``base``,
  ``A_j - external_j`` as ``below`` and ``G_j`` as ``grad``; phases (X the batch bytes)::

      forward at l:   X + sum_j base_j + sum_{j<l} below_j + F_l
      backward at l:  X + sum_j base_j + sum_{j<l} below_j + sum_{j>l} grad_j + B_l
      optimizer at l: X + sum_j base_j + sum_j grad_j + S_l

  (``j<l``: before l in topological order, as estimate sums). A recomputed block is no exception:
  estimate's own terms for it are its input as A_l, its forward with only that input kept as F_l,
  and as B_l the larger of its forward's re-run (with the incoming gradient live) and its backward
  over the re-materialized tensors (`costmodel.tape`), each a function of its own option only.
  The optimizer step's max over temporaries ``S = max_l S_l`` becomes one phase per layer. A backward phase exists only where
  layer l is in the backward pass. Where it is not, no ancestor of l trains, so none saves
  anything; if every layer before l is an ancestor (a chain), the row then sums to
  ``X + sum_j base_j + sum_j grad_j``, which the optimizer rows bound, and its coefficient 0 keeps
  the ILP well scaled. Otherwise l's options outside the backward pass get ``-M``, M above any
  phase, so that row never attains the max.

Then peak = max over phases, exactly `estimate(...).peak_bytes` (tests compare on random plans).
Quantities are bytes and FLOPs (2 per multiply-add), as Python/NumPy integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from costmodel.estimate import (OPTIMIZERS, batch_syms, layer_ancestors, layer_cost,
                                layer_state, normalize_mode)
from costmodel.mode import TrainMode
from costmodel.spec import ModelSpec
from costmodel.tape import LayerCost

OBJECTIVES = ("blocks", "params")
FROZEN = ("bf16", "int8")  # how a plan may hold its frozen linear weights besides the model's dtype
BITS = {"bf16": 16, "int8": 8, "fp32": 32}
MAX_COST = 2**62  # bytes or FLOPs of one step the planner handles: its int64 sums stay exact below this


def trains(state) -> bool:
    """Whether a layer state (see `layer_state`, or `Recomputed`) holds trained parameters."""
    return state not in (False, "frozen")


@dataclass(frozen=True)
class Recomputed:
    """The state of a trained block ('full' or a LoRA rank) that keeps only its input in the forward
    pass and re-runs its forward in backward (``recompute:`` of `TrainMode`)."""

    state: str | int

    def __str__(self) -> str:
        return f"{self.state}+recompute"


def trained_state(state):
    """What a state trains: 'full', a LoRA rank, 'frozen', or the layer's flag; `Recomputed` unwrapped."""
    return state.state if isinstance(state, Recomputed) else state


@dataclass(frozen=True)
class Objective:
    """What a plan maximizes, lexicographically: ``primary``, then trained parameter bytes, then
    -FLOPs per step (recomputation only where it buys value), then the precision of the frozen
    weights (compact ones only where they buy value), then -peak.

    ``kind`` 'blocks': primary = number of fully trained blocks; 'params': primary = trained parameter
    bytes; 'weights': primary = sum of ``weights[b]`` over fully trained blocks b.
    """

    kind: str = "blocks"
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in (*OBJECTIVES, "weights"):
            raise ValueError(f"objective: unknown {self.kind!r} (blocks, params, or per-block weights)")
        if (self.kind == "weights") != bool(self.weights):
            raise ValueError("objective: per-block weights go with kind 'weights', and only with it")
        if not all(math.isfinite(w) and w >= 0 for w in self.weights):
            raise ValueError("objective: block weights must be finite and >= 0")

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """'blocks', 'params', or comma-separated per-block weights such as '1,1,2,4'."""
        if text in OBJECTIVES:
            return cls(text)
        try:
            return cls("weights", tuple(float(w) for w in text.split(",")))
        except ValueError:
            raise ValueError(f"objective: expected blocks, params or weights like 1,1,2, got {text!r}") from None

    def __str__(self) -> str:
        return ",".join(f"{w:g}" for w in self.weights) if self.weights else self.kind

    @property
    def meaning(self) -> str:
        """What the primary value counts, for people."""
        return {"blocks": "fully trained blocks", "params": "trained parameter bytes",
                "weights": "weight of the fully trained blocks"}[self.kind]

    def primary(self, spec: ModelSpec, layer: str, state, cost: LayerCost) -> float:
        if self.kind == "params":
            return cost.trained_param_bytes
        if not layer.startswith("block.") or trained_state(state) != "full":
            return 0
        if self.kind == "blocks":
            return 1
        if len(self.weights) != spec.n_blocks:
            raise ValueError(f"objective: {len(self.weights)} weights for {spec.name}'s {spec.n_blocks} blocks")
        return self.weights[int(layer.split(".")[1])]


@dataclass(frozen=True)
class Option:
    """One layer in one state, with its input requiring grad or not; ``cost`` includes the optimizer."""

    layer: str
    state: str | int | bool | Recomputed
    input_grad: bool
    cost: LayerCost

    @property
    def trains(self) -> bool:
        return trains(self.state)


@dataclass
class PlanCosts:
    """Quantities of one or many plans (arrays when many): bytes, FLOPs per step, objective, and the
    bits per frozen linear weight (32 for fp32, 16, 8)."""

    peak_bytes: np.ndarray
    step_flops: np.ndarray
    upload_bytes: np.ndarray
    trained_bytes: np.ndarray
    primary: np.ndarray
    weight_bytes: np.ndarray  # of the tensor peak: weights, allocated once (no allocator slack on them)
    precision: np.ndarray

    def take(self, index) -> "PlanCosts":
        """The quantities of the plans at ``index``."""
        return PlanCosts(*(getattr(self, f.name)[index] for f in fields(self)))


class CostTable:
    """The options of ``spec`` at one batch/seq/optimizer, and every planned quantity as a linear form.

    ``lora_ranks`` is the menu of LoRA ranks a block not fully trained may take; with ``recompute``, a
    trained block (full or LoRA) may also be `Recomputed`; ``frozen`` holds every plan's frozen
    linear weights compact ('bf16' or 'int8'; None: in the model's dtype).
    """

    def __init__(self, spec: ModelSpec, batch: int, seq: int | None, optimizer: str,
                 lora_ranks: tuple[int, ...] = (), objective: Objective = Objective(), recompute: bool = False,
                 frozen: str | None = None):
        if batch < 1:
            raise ValueError(f"batch: must be >= 1, got {batch}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: unknown {optimizer!r} ({', '.join(OPTIMIZERS)})")
        if any(r < 1 for r in lora_ranks):
            raise ValueError(f"lora ranks: must be >= 1, got {list(lora_ranks)}")
        try:
            self.tokens = spec.tokens_per_sample(seq)
        except ValueError as exc:
            raise ValueError(f"seq: {exc} ({spec.name})") from None
        if frozen not in (None, *FROZEN):
            raise ValueError(f"frozen: unknown {frozen!r} ({', '.join(FROZEN)})")
        normalize_mode(spec, TrainMode(frozen=frozen))  # refuses the model's own dtype
        self.spec, self.batch, self.seq, self.optimizer, self.frozen = spec, batch, seq, optimizer, frozen
        self.precision = BITS[frozen or spec.dtype]
        self.lora_ranks = tuple(sorted(set(lora_ranks)))
        self.objective, self.recompute = objective, recompute
        self.ancestors: dict[str, frozenset[str]] = dict(layer_ancestors(spec))
        self.layers = list(self.ancestors)  # topological order, as estimate sums
        fixed = normalize_mode(spec, TrainMode())
        trained = ["full", *self.lora_ranks]
        block_states = ["frozen", *trained, *(map(Recomputed, trained) if recompute else ())]
        self.states = {name: block_states if name.startswith("block.") else [layer_state(fixed, name)]
                       for name in self.layers}
        self.options: list[Option] = []
        self.layer_options: dict[str, list[int]] = {}
        for name in self.layers:
            self.layer_options[name] = []
            for flag in self._input_grad_flags(name):
                for state in self.states[name]:
                    cost = layer_cost(spec, name, trained_state(state), flag, batch, self.tokens,
                                      isinstance(state, Recomputed), frozen, optimizer)
                    self.layer_options[name].append(len(self.options))
                    self.options.append(Option(name, state, flag, cost))
        self.index = {(o.layer, o.state, o.input_grad): i for i, o in enumerate(self.options)}
        inputs, targets = batch_syms(spec, batch, self.tokens)
        self.batch_bytes = inputs.nbytes + targets.nbytes
        self._check_magnitude()

    def _check_magnitude(self) -> None:
        """Refuse a model whose largest plan needs MAX_COST bytes or FLOPs per step or more (each layer at
        its most expensive option): beyond the int64 arithmetic of the frontier and the ILP."""
        def most(value) -> int:
            return sum(max(value(self.options[i].cost) for i in opts) for opts in self.layer_options.values())

        flops = most(lambda c: c.fwd_flops + c.bwd_flops)
        memory = self.batch_bytes + most(lambda c: c.param_bytes + c.optimizer_bytes + c.buffer_bytes + c.grad_bytes
                                         + abs(c.activation_bytes - c.external_saved_bytes) + c.fwd_peak_bytes
                                         + c.bwd_peak_bytes + c.step_temp_bytes + c.upload_bytes)
        for figure, unit in ((flops, "FLOPs"), (memory, "bytes")):
            if figure >= MAX_COST:
                raise ValueError(f"{self.spec.name} at batch {self.batch} x {self.tokens} tokens: up to {figure:.3g} "
                                 f"{unit} per step, beyond the {MAX_COST:.3g} the planner handles")

    def _input_grad_flags(self, name: str) -> list[bool]:
        """The values 'input requires grad' can take: fixed where an ancestor always or never trains."""
        trainable = [a for a in self.ancestors[name] if any(map(trains, self.states[a]))]
        if any(all(map(trains, self.states[a])) for a in trainable):
            return [True]
        return [False, True] if trainable else [False]

    # -- linear forms over options ------------------------------------------------------------
    def _vector(self, value) -> np.ndarray:
        return np.array([value(o) for o in self.options], dtype=np.int64)

    @cached_property
    def step_flops(self) -> np.ndarray:
        """FLOPs of one step (forward + backward) per option."""
        return self._vector(lambda o: o.cost.fwd_flops + o.cost.bwd_flops)

    @cached_property
    def upload_bytes(self) -> np.ndarray:
        return self._vector(lambda o: o.cost.upload_bytes)

    @cached_property
    def trained_bytes(self) -> np.ndarray:
        """Trained parameter bytes per option (the objective's first tie-break)."""
        return self._vector(lambda o: o.cost.trained_param_bytes)

    @cached_property
    def weight_bytes(self) -> np.ndarray:
        """Parameter bytes per option (`costmodel.process.churned_bytes` leaves them out of the slack)."""
        return self._vector(lambda o: o.cost.param_bytes)

    @cached_property
    def primary(self) -> np.ndarray:
        """The objective's primary value per option (float)."""
        return np.array([self.objective.primary(self.spec, o.layer, o.state, o.cost) for o in self.options],
                        dtype=float)

    @cached_property
    def memory_terms(self) -> dict[str, np.ndarray]:
        """Per option, the bytes each memory phase adds up: base (parameters, optimizer state, buffers),
        below (saved activations the caller does not hold), grad, fwd (F), bwd (B), temp (S), and
        in_backward (bool)."""
        c = [o.cost for o in self.options]
        vector = lambda values: np.array(list(values), dtype=np.int64)  # noqa: E731
        return {"base": vector(x.param_bytes + x.optimizer_bytes + x.buffer_bytes for x in c),
                "below": vector(x.activation_bytes - x.external_saved_bytes for x in c),
                "grad": vector(x.grad_bytes for x in c),
                "fwd": vector(x.fwd_peak_bytes for x in c),
                "bwd": vector(x.bwd_peak_bytes for x in c),
                "temp": vector(x.step_temp_bytes for x in c),
                "in_backward": np.array([x.in_backward for x in c], dtype=bool)}

    @cached_property
    def phase_coefficients(self) -> np.ndarray:
        """Coefficients of every memory phase, shape (phases, options): forward at each layer, backward at
        each layer, optimizer step at each layer; a phase's bytes are ``batch_bytes + coefficients @ z``
        for the plan's 0/1 option vector z."""
        t = self.memory_terms
        base, below, grad = t["base"], t["below"], t["grad"]
        position = np.array([self.layers.index(o.layer) for o in self.options])
        never = int(sum(max(sum(int(t[k][i]) for k in ("base", "below", "grad", "fwd", "bwd", "temp")) for i in opts)
                        for opts in self.layer_options.values())) + self.batch_bytes + 1
        forward, backward, step = [], [], []
        for at, layer in enumerate(self.layers):
            own = position == at
            forward.append(base + below * (position < at) + t["fwd"] * own)
            absent = 0 if set(self.layers[:at]) <= self.ancestors[layer] else -never
            backward.append(base + below * (position < at) + grad * (position > at)
                            + np.where(own, np.where(t["in_backward"], t["bwd"], absent), 0))
            step.append(base + grad + t["temp"] * own)
        return np.stack(forward + backward + step)

    # -- plans ----------------------------------------------------------------------------------
    def selection(self, mode: TrainMode) -> list[int]:
        """The option index of each layer (in ``layers`` order) for ``mode``."""
        mode = normalize_mode(self.spec, mode)
        if layer_state(mode, "embed") not in self.states["embed"]:
            raise ValueError(f"{mode}: the planner keeps untied embeddings frozen")
        for block, rank in mode.lora.items():
            if rank not in self.lora_ranks:
                raise ValueError(f"LoRA rank {rank} of block {block} is not in the menu {list(self.lora_ranks)}")
        if mode.recompute and not self.recompute:
            raise ValueError(f"{mode}: recomputation is not in the menu (plan with recompute on)")
        if mode.frozen != self.frozen:
            raise ValueError(f"{mode}: this table holds frozen weights {self.frozen or 'in ' + self.spec.dtype}")
        recomputed = {f"block.{b}" for b in mode.recompute}
        states = {name: Recomputed(layer_state(mode, name)) if name in recomputed else layer_state(mode, name)
                  for name in self.layers}
        trained = {name for name in self.layers if trains(states[name])}
        return [self.index[name, states[name], bool(self.ancestors[name] & trained)] for name in self.layers]

    @cached_property
    def head_only(self) -> np.ndarray:
        """The smallest plan: only the head trains (and tied embeddings)."""
        return np.array(self.selection(TrainMode(frozen=self.frozen)))

    def block_training(self, selections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per plan (rows of option indices; a row of -1 is no plan) and block: whether the block
        trains fully, and whether it trains with LoRA."""
        blocks = selections[:, [self.layers.index(f"block.{b}") for b in range(self.spec.n_blocks)]]
        full = np.array([trained_state(o.state) == "full" for o in self.options])
        lora = np.array([o.layer.startswith("block.") and o.trains and not full[i] for i, o in enumerate(self.options)])
        return full[blocks] & (blocks >= 0), lora[blocks] & (blocks >= 0)

    def mode(self, selection) -> TrainMode:
        """The TrainMode of a selection (option indices, one per layer)."""
        return self.mode_of({self.options[i].layer: self.options[i].state for i in selection})

    def mode_of(self, states: dict) -> TrainMode:
        """The TrainMode giving each layer its state in ``states`` (layer name -> state)."""
        blocks = [states[f"block.{b}"] for b in range(self.spec.n_blocks)]
        trained = [trained_state(state) for state in blocks]
        return normalize_mode(self.spec, TrainMode(
            blocks=frozenset(b for b, state in enumerate(trained) if state == "full"),
            lora={b: state for b, state in enumerate(trained) if trains(state) and state != "full"},
            recompute=frozenset(b for b, state in enumerate(blocks) if isinstance(state, Recomputed)),
            frozen=self.frozen))

    def evaluate(self, selections: np.ndarray) -> PlanCosts:
        """Quantities of plans given as option indices, shape (plans, layers)."""
        selections = np.atleast_2d(selections)
        peak = self.batch_bytes + self.phase_coefficients[:, selections].sum(axis=2).max(axis=0)
        return PlanCosts(peak, self.step_flops[selections].sum(axis=1), self.upload_bytes[selections].sum(axis=1),
                         self.trained_bytes[selections].sum(axis=1), self.primary[selections].sum(axis=1),
                         self.weight_bytes[selections].sum(axis=1),
                         np.full(len(selections), self.precision))
