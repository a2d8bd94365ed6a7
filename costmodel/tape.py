"""A symbolic tape that mirrors what autograd does for one layer of a training step.

Each module's ``cost`` method replays its ``forward`` on `Sym` tensors (shape, dtype,
requires-grad, storage) through a `Tape`. The tape applies torch's rules, as they hold
on torch 2.13 (checked against ``FlopCounterMode`` and ``saved_tensors_hooks``):

- a matmul costs 2 FLOPs per multiply-add forward; backward costs the same again for
  each operand that requires grad (input-gradient for activations, weight-gradient for
  trained weights), nothing when its output does not require grad;
- an op saves tensors for backward only when its output requires grad; a linear saves
  its input only when its weight trains; LayerNorm saves input, mean and rstd; GELU
  its input; ReLU, tanh and softmax their output; dropout its scaled mask; a batched
  matmul the operand the *other* operand's gradient needs; CPU SDPA saves q, k, v,
  output, a float32 logsumexp and its additive mask, if any; embeddings their int64
  indices; cross-entropy its log-probabilities, int64 targets and a scalar total weight.
  Saved bytes count each storage once; parameters and buffers are not activations.

From the op list the tape also derives the layer's memory timeline: live bytes of
its activations at the worst point of the forward pass, and of saved tensors plus
gradients at the worst point of its backward pass (`LayerCost.fwd_peak_bytes`,
`LayerCost.bwd_peak_bytes`).

A recomputed layer (non-reentrant ``torch.utils.checkpoint``) saves only its input in the
forward pass; everything its ops save is a temporary. In backward, the first unpack re-runs
its forward, storing what each op saves, and stops (early stop, torch's default) as soon as
the last tensor saved in the forward pass is saved again. An op saves its inputs (and
parameters: a linear whose input requires grad saves its weight) before it computes, its
results after: so the re-run includes the last saving op only if that op saves a result.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from costmodel.wire import array_wire_bound

_storage_ids = itertools.count()


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor: shape, bytes per element, whether it requires grad, its storage. A slice
    modelled as a tensor of its own (its gradient is its own) names in ``base`` the tensor it is a view
    of: saving it keeps all of ``base``."""

    shape: tuple[int, ...]
    itemsize: int
    requires_grad: bool
    storage: int = field(default_factory=lambda: next(_storage_ids))
    storage_bytes: int = -1
    base: "Sym | None" = None

    def __post_init__(self):
        if self.storage_bytes < 0:
            object.__setattr__(self, "storage_bytes", self.numel * self.itemsize)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def view(self, *shape: int) -> "Sym":
        """A view: same storage, new shape."""
        return Sym(tuple(shape), self.itemsize, self.requires_grad, self.storage, self.storage_bytes, self.base)


@dataclass
class _Op:
    inputs: list[Sym]
    outputs: list[Sym]
    saved: list[Sym]
    grad_inputs: list[Sym]  # inputs that receive a gradient in backward
    param_grad_bytes: int
    passes_grad: bool = False  # backward hands the output's gradient on as is (an add)
    flops: int = 0  # forward matmul FLOPs of this op
    elementwise_flops: int = 0
    saves_weight: bool = False  # saves a parameter (not an activation), which checkpoint counts too
    bwd_temp_bytes: int = 0  # a transient its backward makes besides the gradients (a dequantized weight)

    @property
    def packs(self) -> bool:
        return bool(self.saved) or self.saves_weight

    @property
    def packs_results(self) -> bool:
        """Whether it saves a tensor it made (after computing it), not only its inputs."""
        return not {t.storage for t in self.saved} <= {(t.base or t).storage for t in self.inputs}


@dataclass
class LayerCost:
    """Costs of one layer in one training step. FLOPs count 2 per multiply-add; sizes in bytes."""

    name: str
    fwd_flops: int = 0
    bwd_input_flops: int = 0
    bwd_weight_flops: int = 0
    recompute_flops: int = 0  # forward FLOPs re-run in backward (a recomputed layer)
    elementwise_flops: int = 0
    activation_bytes: int = 0
    param_bytes: int = 0
    trained_param_bytes: int = 0
    grad_bytes: int = 0  # parameter gradients this layer's backward creates
    optimizer_bytes: int = 0
    buffer_bytes: int = 0
    trained_tensors: int = 0
    largest_trained_tensor_bytes: int = 0
    step_temp_bytes: int = 0
    upload_bytes: int = 0  # trained tensors on the wire, a bound (`costmodel.wire`)
    external_saved_bytes: int = 0
    fwd_peak_bytes: int = 0
    bwd_peak_bytes: int = 0
    in_backward: bool = False

    @property
    def bwd_flops(self) -> int:
        """Everything the backward pass runs: input and weight gradients, and any recomputation."""
        return self.bwd_input_flops + self.bwd_weight_flops + self.recompute_flops



class Tape:
    """Records the ops of one layer and turns them into a `LayerCost`."""

    def __init__(self, name: str, itemsize: int, grad_enabled: bool, compact: str | None = None):
        """``compact``: 'bf16' or 'int8' holds this layer's frozen linear weights so (`costmodel.compact`)."""
        self.cost = LayerCost(name)
        self.itemsize = itemsize
        self.grad_enabled = grad_enabled
        self.compact = compact
        self.ops: list[_Op] = []
        self._counted = (0, 0)  # fwd and elementwise FLOPs already attributed to recorded ops

    # -- tensors -----------------------------------------------------------------
    def tensor(self, *shape: int, requires_grad: bool = False, itemsize: int | None = None) -> Sym:
        return Sym(tuple(shape), itemsize or self.itemsize, requires_grad and self.grad_enabled)

    def _record(self, inputs, outputs, saved=(), param_grad_bytes=0, passes_grad=False, saves_weight=False,
                bwd_temp_bytes=0):
        """Append an op; the FLOPs counted since the previous op are its own."""
        grad = any(o.requires_grad for o in outputs)  # false for a hold: no outputs
        counted = (self.cost.fwd_flops, self.cost.elementwise_flops)
        flops, elementwise = (now - before for now, before in zip(counted, self._counted))
        self._counted = counted
        saved = [t.base or t for t in saved] if grad else []  # a saved view keeps its whole base
        self.ops.append(_Op(list(inputs), list(outputs), saved,
                            [i for i in inputs if i.requires_grad] if grad else [],
                            param_grad_bytes if grad else 0, passes_grad, flops, elementwise, saves_weight and grad,
                            bwd_temp_bytes if grad else 0))

    def _matmul_flops(self, flops: int, a_grad: bool, b_grad: bool, out_grad: bool, b_is_weight: bool) -> None:
        """A matmul of a (an activation) and b: forward FLOPs, and backward FLOPs per operand needing grad."""
        self.cost.fwd_flops += flops
        if out_grad:
            self.cost.bwd_input_flops += flops * (a_grad + (b_grad and not b_is_weight))
            self.cost.bwd_weight_flops += flops * (b_grad and b_is_weight)

    def hold(self, *tensors: Sym) -> None:
        """Keep tensors alive up to here: a module's arguments live until it returns."""
        self._record(tensors, [])

    def buffers(self, nbytes: int) -> None:
        """Declare a buffer (not trained, not an activation) of ``nbytes`` bytes."""
        self.cost.buffer_bytes += nbytes

    def params(self, *sizes: int, trained: bool, grad_exists: bool = False) -> int:
        """Declare parameter tensors of this layer (elements each); returns their bytes.

        Trained ones get gradients, optimizer state and uploads; ``grad_exists`` when a layer
        above already created the gradient (a tied weight), so this layer only adds to it."""
        nbytes = sum(sizes) * self.itemsize
        self.cost.param_bytes += nbytes
        if trained:
            self.cost.trained_param_bytes += nbytes
            self.cost.grad_bytes += 0 if grad_exists else nbytes
            self.cost.trained_tensors += len(sizes)
            self.cost.upload_bytes += sum(array_wire_bound(size * self.itemsize) for size in sizes)
            self.cost.largest_trained_tensor_bytes = max(self.cost.largest_trained_tensor_bytes,
                                                         max(sizes) * self.itemsize)
        return nbytes

    # -- ops ---------------------------------------------------------------------
    def linear(self, x: Sym, d_out: int, trained: bool, bias: bool = True, owns_weight: bool = True) -> Sym:
        """``F.linear`` (or ``addmm``); the weight is (d_out, d_in); a tied weight is counted by its owner.
        A frozen weight of a compact layer is a `compact_linear`."""
        if self.compact and not trained and owns_weight:
            return self.compact_linear(x, d_out, bias)
        d_in = x.shape[-1]
        sizes = (d_in * d_out, d_out) if bias else (d_in * d_out,)
        if owns_weight:
            self.params(*sizes, trained=trained)
        elif trained:  # a tied weight: its owner counts it, but its gradient starts here
            self.cost.grad_bytes += sum(sizes) * self.itemsize
        out = self.tensor(*x.shape[:-1], d_out, requires_grad=x.requires_grad or trained)
        rows = x.numel // d_in
        self._matmul_flops(2 * rows * d_in * d_out, x.requires_grad, trained, out.requires_grad, True)
        self._record([x], [out], [x] if trained else [], sum(sizes) * self.itemsize if trained else 0,
                     saves_weight=x.requires_grad)
        return out

    def compact_linear(self, x: Sym, d_out: int, bias: bool) -> Sym:
        """`costmodel.compact.CompactLinear`: the weight held as bf16, or int8 with a scale per output
        channel; dequantizing makes a transient weight in the model's dtype (an elementwise op: a cast,
        or one multiply per weight, counted forward only like every elementwise op), live while the matmul
        runs, and again in backward when the input needs a gradient; it saves only the compact weight and
        scales (buffers, not activations)."""
        d_in = x.shape[-1]
        weight_bytes = d_in * d_out * (2 if self.compact == "bf16" else 1)
        scales = d_out if self.compact == "int8" else 0
        self.cost.param_bytes += weight_bytes + (scales + (d_out if bias else 0)) * self.itemsize
        weight = self.tensor(d_out, d_in)
        self.cost.elementwise_flops += d_in * d_out if scales else 0
        self._record([], [weight])
        out = self.tensor(*x.shape[:-1], d_out, requires_grad=x.requires_grad)
        self._matmul_flops(2 * (x.numel // d_in) * d_in * d_out, x.requires_grad, False, out.requires_grad, True)
        self._record([x, weight], [out], saves_weight=x.requires_grad, bwd_temp_bytes=weight.nbytes)
        return out

    def lora_linear(self, x: Sym, d_out: int, rank: int) -> Sym:
        """peft's LoRA Linear: frozen base + B(A(x)) * scaling, A and B trained, no bias."""
        base = self.linear(x, d_out, trained=False)
        down = self.linear(x, rank, trained=True, bias=False)
        up = self.linear(down, d_out, trained=True, bias=False)
        scaled = self.pointwise(up, flops_per_element=1)
        return self.add(base, scaled)

    def bmm(self, a: Sym, b: Sym, out_shape: tuple[int, ...], contraction: int) -> Sym:
        """Batched matmul of 3-d activations; saves each operand the other's gradient needs."""
        out = self.tensor(*out_shape, requires_grad=a.requires_grad or b.requires_grad)
        self._matmul_flops(2 * math.prod(out_shape) * contraction, a.requires_grad, b.requires_grad,
                           out.requires_grad, False)
        saved = ([a] if b.requires_grad else []) + ([b] if a.requires_grad else [])
        self._record([a, b], [out], saved)
        return out

    def sdpa(self, q: Sym, k: Sym, v: Sym, mask: Sym | None = None) -> Sym:
        """CPU ``scaled_dot_product_attention`` (flash kernel): FLOPs as its math reference
        (two batched matmuls forward, four backward); saves q, k, v, out, a float32 logsumexp
        and the additive ``mask`` added to the scores, if given."""
        batch, heads, seq, head_dim = q.shape
        masks = [] if mask is None else [mask]
        out = self.tensor(*q.shape, requires_grad=q.requires_grad or k.requires_grad or v.requires_grad)
        flops = 2 * batch * heads * seq * seq * head_dim
        self._matmul_flops(2 * flops, True, True, out.requires_grad, False)
        self.cost.elementwise_flops += (5 + len(masks)) * batch * heads * seq * seq
        logsumexp = self.tensor(batch, heads, seq, itemsize=4)
        self._record([q, k, v, *masks], [out], [q, k, v, out, logsumexp, *masks])
        return out

    def padding_bias(self, batch: int, seq: int) -> Sym:
        """`Attention.padding_bias`: a (batch, 1, 1, seq) additive mask of padded keys, made from the
        token ids (a bool ``ids == pad`` temporary, zeros filled in place); needs no gradient."""
        bias = self.tensor(batch, 1, 1, seq)
        self.cost.elementwise_flops += 2 * batch * seq  # compare, fill
        self._record([], [bias, self.tensor(batch, seq, itemsize=1)])
        return bias

    def layer_norm(self, x: Sym, trained: bool) -> Sym:
        nbytes = self.params(x.shape[-1], x.shape[-1], trained=trained)
        out = self.tensor(*x.shape, requires_grad=x.requires_grad or trained)
        rows = x.numel // x.shape[-1]
        stats = [self.tensor(rows), self.tensor(rows)]
        self.cost.elementwise_flops += 5 * x.numel
        self._record([x], [out], [x, *stats], nbytes if trained else 0)
        return out

    def pointwise(self, x: Sym, flops_per_element: int, save: str = "none") -> Sym:
        """An elementwise op; save is 'input', 'output' or 'none' (what its backward needs)."""
        out = self.tensor(*x.shape, requires_grad=x.requires_grad)
        self.cost.elementwise_flops += flops_per_element * x.numel
        self._record([x], [out], {"input": [x], "output": [out], "none": []}[save])
        return out

    def activation(self, x: Sym, kind: str) -> Sym:
        if kind == "gelu_new":
            return self._gelu_tanh_formula(x)
        return self.pointwise(x, {"gelu": 8, "relu": 1, "tanh": 4}[kind],
                              save="input" if kind == "gelu" else "output")

    def _gelu_tanh_formula(self, x: Sym) -> Sym:
        """GPT-2's gelu_new written out: 0.5*x * (1 + tanh(sqrt(2/pi) * (x + 0.044715*x**3)))."""
        half = self.pointwise(x, 1)
        inner = self.pointwise(self.pointwise(x, 2, save="input"), 1)  # x**3 (saves x), * 0.044715
        inner = self.pointwise(self.add(x, inner), 1)  # * sqrt(2/pi)
        return self.mul(half, self.pointwise(self.pointwise(inner, 4, save="output"), 1))  # tanh, 1 +

    def mul(self, a: Sym, b: Sym) -> Sym:
        """Elementwise product of two activations; saves each operand the other's gradient needs."""
        out = self.tensor(*a.shape, requires_grad=a.requires_grad or b.requires_grad)
        self.cost.elementwise_flops += a.numel
        self._record([a, b], [out], ([a] if b.requires_grad else []) + ([b] if a.requires_grad else []))
        return out

    def softmax(self, x: Sym) -> Sym:
        return self.pointwise(x, 5, save="output")

    def dropout(self, x: Sym, p: float) -> Sym:
        """Training-mode dropout: identity when p == 0, else saves its scaled mask (same dtype)."""
        if p == 0:
            return x
        out = self.tensor(*x.shape, requires_grad=x.requires_grad)
        mask = self.tensor(*x.shape)
        self.cost.elementwise_flops += 2 * x.numel
        self._record([x], [out, mask], [mask])
        return out

    def add_param(self, x: Sym, count: int, trained: bool) -> Sym:
        """Add a (broadcast) parameter of ``count`` elements, e.g. learned positions; saves nothing."""
        nbytes = self.params(count, trained=trained)
        out = self.tensor(*x.shape, requires_grad=x.requires_grad or trained)
        self.cost.elementwise_flops += x.numel
        self._record([x], [out], param_grad_bytes=nbytes if trained else 0)
        return out

    def add(self, a: Sym, b: Sym) -> Sym:
        out = self.tensor(*a.shape, requires_grad=a.requires_grad or b.requires_grad)
        self.cost.elementwise_flops += a.numel
        self._record([a, b], [out], passes_grad=True)
        return out

    def split(self, x: Sym, parts: int) -> list[Sym]:
        """Equal slices of the last dimension: views in forward, but each gets its own gradient,
        which backward concatenates into one for ``x``; modelled as separate tensors."""
        shape = (*x.shape[:-1], x.shape[-1] // parts)
        slices = [self.tensor(*shape, requires_grad=x.requires_grad) for _ in range(parts)]
        self._record([x], slices)
        return slices

    def copy(self, x: Sym, *shape: int, itemsize: int | None = None) -> Sym:
        """A reshape that must copy (e.g. heads back to width); no FLOPs, saves nothing."""
        out = self.tensor(*shape, requires_grad=x.requires_grad, itemsize=itemsize)
        self._record([x], [out])
        return out

    def embedding(self, ids: Sym, num: int, dim: int, trained: bool, grad_exists: bool = False) -> Sym:
        nbytes = self.params(num * dim, trained=trained, grad_exists=grad_exists)
        out = self.tensor(*ids.shape, dim, requires_grad=trained)
        # backward makes a dense (num, dim) gradient; onto an existing one it is summed out of place
        self._record([ids], [out], [ids], (2 if grad_exists else 1) * nbytes if trained else 0)
        return out

    def conv_patches(self, image: Sym, out_channels: int, patch: int, trained: bool) -> Sym:
        """Conv2d with kernel = stride = patch; saves the image when the weight trains."""
        batch, channels, height, width = image.shape
        nbytes = self.params(out_channels * channels * patch * patch, out_channels, trained=trained)
        out = self.tensor(batch, out_channels, height // patch, width // patch, requires_grad=trained)
        self._matmul_flops(2 * out.numel * channels * patch * patch, False, trained, trained, True)
        self._record([image], [out], [image], nbytes if trained else 0)
        return out

    def cross_entropy(self, logits: Sym, targets: Sym) -> Sym:
        """Mean cross-entropy: log_softmax (saves its output) then nll_loss (targets, total weight)."""
        log_probs = self.pointwise(logits, 5, save="output")
        loss = self.tensor(requires_grad=logits.requires_grad)
        self._record([log_probs, targets], [loss], [log_probs, targets, self.tensor()])
        return loss

    # -- summary -----------------------------------------------------------------
    def finish(self, inputs: list[Sym], outputs: list[Sym], external: set[int] = frozenset(),
               recompute: bool = False) -> LayerCost:
        """Fill in activation bytes and the forward/backward memory peaks of this layer.

        ``inputs`` arrive live from the layer below; ``outputs`` leave live to the layer above.
        Forward peak: bytes this layer holds (its saved tensors so far, its live intermediates
        and its input) at its worst op. Backward peak: its saved tensors not yet released,
        the parameter gradients it has produced, and live activation gradients (the incoming
        gradient of its outputs included), at its worst op. ``external`` storages (the batch)
        are held by the caller for the whole step and left out of both peaks.
        ``recompute``: the layer runs under non-reentrant checkpoint (see the module docstring);
        it saves only its inputs, and its backward starts by re-running its forward.
        """
        cost = self.cost
        saved: dict[int, int] = {}
        last_saved_by: dict[int, int] = {}
        for index, op in enumerate(self.ops):
            for t in op.saved:
                saved.setdefault(t.storage, t.storage_bytes)
                last_saved_by.setdefault(t.storage, index)  # backward frees it at its first saver
        saved_bytes = sum(saved.values())
        cost.external_saved_bytes = sum(b for s, b in saved.items() if s in external)
        saved = {s: b for s, b in saved.items() if s not in external}
        inputs = [t for t in inputs if t.storage not in external]
        cost.in_backward = any(o.requires_grad for op in self.ops for o in op.outputs)
        outputs_kept = {t.storage for t in outputs}
        if recompute:
            kept = {t.storage: t.storage_bytes for t in inputs}  # checkpoint saves the layer's inputs
            cost.activation_bytes, cost.external_saved_bytes = sum(kept.values()), 0
            cost.fwd_peak_bytes = self._forward_peak(inputs, self.ops, outputs_kept | set(kept))
            # the re-run forward, with the gradient of the outputs live, then backward as usual
            rerun = self._rerun_ops()
            cost.recompute_flops = sum(op.flops for op in rerun)
            cost.elementwise_flops += sum(op.elementwise_flops for op in rerun)
            incoming = sum(t.storage_bytes for t in outputs if t.requires_grad)
            saved.update(kept)
            last_saved_by.update({storage: 0 for storage in kept})
            rerun_peak = self._forward_peak(inputs, rerun, set(saved)) + incoming
            cost.bwd_peak_bytes = max(rerun_peak, self._backward_peak(outputs, saved, last_saved_by))
            return cost
        cost.activation_bytes = saved_bytes
        cost.fwd_peak_bytes = self._forward_peak(inputs, self.ops, outputs_kept | set(saved))
        cost.bwd_peak_bytes = self._backward_peak(outputs, saved, last_saved_by) if cost.in_backward else 0
        return cost

    def _rerun_ops(self) -> list[_Op]:
        """The ops checkpoint re-runs in backward: up to the last one that saves, which runs only if it
        saves a result of its own (it saves its inputs before computing, and checkpoint stops there)."""
        last = max((index for index, op in enumerate(self.ops) if op.packs), default=-1)
        if last < 0:
            return []
        return self.ops[:last + 1] if self.ops[last].packs_results else self.ops[:last]

    @staticmethod
    def _forward_peak(inputs: list[Sym], ops: list[_Op], keep: set[int]) -> int:
        """Most bytes live while ``ops`` run from ``inputs``; a tensor is freed after its last use
        unless its storage is in ``keep`` (saved for backward, or an output)."""
        last_use: dict[int, int] = {}
        for index, op in enumerate(ops):
            for t in op.inputs:
                last_use[t.storage] = index
        live = {t.storage: t.storage_bytes for t in inputs}
        total = peak = sum(live.values())
        for index, op in enumerate(ops):
            for t in (*op.outputs, *op.saved):
                if t.storage not in live:
                    live[t.storage] = t.storage_bytes
                    total += t.storage_bytes
            peak = max(peak, total)
            for t in (*op.inputs, *op.outputs, *op.saved):
                if t.storage in live and last_use.get(t.storage, -1) <= index and t.storage not in keep:
                    total -= live.pop(t.storage)
        return peak

    def _backward_peak(self, outputs, saved, last_saved_by) -> int:
        # live gradients keyed by storage; the outputs' gradients arrive from above
        grads = {t.storage: t.storage_bytes for t in outputs if t.requires_grad}
        released_at: dict[int, list[int]] = {}
        for storage, index in last_saved_by.items():
            if storage in saved:
                released_at.setdefault(index, []).append(storage)
        held = sum(saved.values())
        grad_total = sum(grads.values())
        peak = held + grad_total
        for index in range(len(self.ops) - 1, -1, -1):
            op = self.ops[index]
            # an add hands its output's gradient to its first input without a copy; a gradient
            # arriving at a tensor that already has one is summed out of place (old, new, sum)
            passed = op.passes_grad and any(t.storage in grads for t in op.outputs)
            extra = op.param_grad_bytes  # bytes live at this op beyond ``held`` and ``grads``
            sums = 0  # gradients summed onto existing ones, after the op's own transient is freed
            for position, t in enumerate(op.grad_inputs):
                new_bytes = 0 if passed and position == 0 else t.storage_bytes
                if t.storage in grads:
                    extra += new_bytes
                    sums += t.storage_bytes
                else:
                    grads[t.storage] = t.storage_bytes
                    grad_total += t.storage_bytes
                    extra += new_bytes - t.storage_bytes  # a passed gradient is not new memory
            peak = max(peak, held + grad_total + extra + max(op.bwd_temp_bytes, sums))
            held += op.param_grad_bytes  # parameter gradients stay for the optimizer
            for t in op.outputs:
                grad_total -= grads.pop(t.storage, 0)
            for storage in released_at.get(index, ()):
                held -= saved[storage]
        return peak
