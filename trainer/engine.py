"""The federated engine: the server of a run, the client step, and the in-process loop over rounds.

Every engine (this in-process loop, and Flower's ServerApp and ClientApp in `trainer.flower`)
is the same two pieces. `Server` samples the round, decides each device's training mode and
turns them into tasks (plain JSON-able dicts, which Flower carries as a ``ConfigRecord``); it
aggregates the replies layer-wise (`trainer.server`), evaluates, and checkpoints. `train_client`
runs one task on a device: it reads the device's own data and calls `trainer.local.local_train`.

Every random choice of round r (which devices, which batches, who drops out, FedRA's blocks)
is drawn from generators seeded by (seed, r, device), so a run resumed from the checkpoint of
round r continues exactly as the uninterrupted run would, whatever engine ran it. After each
round the server appends one JSON line to ``metrics.jsonl`` and commits a checkpoint; a resume
checks the run directory first (`trainer.rundir`: its format, integrity record and refusals).
"""

from __future__ import annotations

import random
import time
from collections.abc import MutableMapping
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from costmodel import ModelSpec, TrainMode, build_model, estimate
from costmodel.build import LORA_SCALE
from costmodel.compact import compact_state
from costmodel.measure import check_fits
from costmodel.process import kept_bytes, process_memory
from costmodel.wire import wire_bytes
from planner.planfile import PlanFile
from profiles.runtime import DEFAULT_RUNTIME, load_runtime
from trainer.local import local_train, renumber_blocks
from trainer.methods import METHODS, device_task, shallow_spec, smallest_common_architecture
from trainer.rundir import load_run, plan_digest, save_round
from trainer.server import aggregate, collect
from trainer.tasks import TASKS, device_client, evaluation_set, get_task

TASK_KIND = {name: task.kind for name, task in TASKS.items()}
TASK_SEQ = {name: task.seq for name, task in TASKS.items()}  # tokens per sample the data have


class TrainConfig(BaseModel):
    """A federated run. Counts; seconds; the learning rate is per step."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(pattern="^(shakespeare|fortunes|fashion-mnist)$")
    method: str = "caff"
    rounds: int = Field(default=10, ge=1)
    clients_per_round: int = Field(default=10, ge=1)
    local_steps: int | None = Field(default=None, ge=1, description="None: each device's planned steps")
    lr: float = Field(default=0.01, gt=0, allow_inf_nan=False,
                      description="SGD step; 0.05 makes full-block training of the pretrained char GPTs drift")
    seed: int = 0
    drop_rate: float = Field(default=0.0, ge=0, lt=1, description="chance a sampled device fails mid-round")
    eval_samples: int | None = Field(default=None, ge=1,
                                     description="test samples the server evaluates on (None: the task's whole test set)")
    eval_split: str = Field(default="test", pattern="^(test|validation)$",
                            description="validation: held-out samples of the federated clients disjoint from the "
                                        "test set, for choosing a learning rate")
    eval_every: int = Field(default=1, ge=1, description="evaluate every this many rounds, and after the last")
    pretrained: bool = True
    lora_scale: float = Field(default=LORA_SCALE, gt=0, allow_inf_nan=False,
                              description="LoRA's alpha / rank, for every adapter any device trains")


def _seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(62)


def _batch_stream(x, y, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        yield x[rows], y[rows]


def evaluate(spec: ModelSpec, state: dict[str, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             samples: int | None = None, batch: int = 32) -> tuple[float, float]:
    """(mean loss, accuracy) of the global model on the first ``samples`` (None: all) test samples,
    per target: per character for a char GPT, per sample for a classifier."""
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    x, y = test[0][:samples], test[1][:samples]
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            inputs, targets = x[start:start + batch], y[start:start + batch]
            logits = model.head(model.features(inputs))
            loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += targets.numel()
    return loss_sum / max(count, 1), correct / max(count, 1)


def initial_state(task: str, spec: ModelSpec, pretrained: bool, checkpoints: str | Path | None = None
                  ) -> dict[str, torch.Tensor]:
    """The global model's first weights: the task's pretrained starting point (checkpoints from
    ``checkpoints``, default the committed ones), or random weights."""
    return get_task(task).initial_state(spec, checkpoints) if pretrained else build_model(spec).state_dict()


class Server:
    """The server of a run, whatever engine carries its messages.

    ``tasks(r)`` samples round r and returns what each training device must do (one dict per
    device) and the records of sampled devices that sit out or drop; ``finish(r, records,
    updates, started)`` aggregates the updates, evaluates, appends the round's metrics and
    checkpoints."""

    def __init__(self, config: TrainConfig, plan: PlanFile, out: str | Path, resume: bool = False,
                 checkpoints: str | Path | None = None):
        if config.method not in METHODS:
            raise ValueError(f"method: unknown {config.method!r} ({', '.join(METHODS)})")
        self.plan_sha256 = plan_digest(plan)
        plan = planned_for(config, plan)
        self.config, self.plan, self.out = config, plan, Path(out)
        self.spec = _architecture(config, plan)
        self.test = evaluation_set(get_task(config.task), config.eval_split)
        outputs = self.spec.vocab_size if self.spec.kind == "gpt" else self.spec.n_classes
        if outputs < (needed := get_task(config.task).n_outputs):
            raise ValueError(f"the plan's {self.spec.name} has {outputs} outputs; {config.task} needs {needed}: "
                             f"plan a model with at least {needed}")
        self.state, self.first_round, self.metrics = _start(config, self.plan_sha256, self.spec, self.out, resume,
                                                            checkpoints)

    def tasks(self, round_index: int) -> tuple[list[dict], list[dict]]:
        """(tasks for the devices that train, records of those that sit out or drop), in sampling order."""
        config, plan, spec = self.config, self.plan, self.spec
        sampler = random.Random(_seed(config.seed, round_index, "sample"))
        chosen = sampler.sample(range(len(plan.devices)), min(config.clients_per_round, len(plan.devices)))
        tasks, idle = [], []
        for order, index in enumerate(chosen):
            device = plan.devices[index]
            record = {"device": device.device, "order": order, "memory_budget_bytes": device.budgets.memory_bytes}
            assigned = device_task(config.method, spec, device, plan, _seed(config.seed, round_index, "modes"))
            if assigned is None:
                idle.append({**record, "status": "sat out"})
                continue
            mode, held = assigned
            if held is not None:  # a shallow model of only these blocks (FedRA)
                record["held_blocks"] = list(held)
            if random.Random(_seed(config.seed, round_index, device.device, "drop")).random() < config.drop_rate:
                idle.append({**record, "status": "dropped", "mode": str(mode)})
            else:
                tasks.append({**record, "index": index, "mode": str(mode), "round": round_index, "task": config.task,
                              "n_devices": len(plan.devices), "seed": config.seed, "spec": spec.model_dump_json(),
                              "steps": config.local_steps or device.budgets.local_steps, "runtime": device.runtime,
                              "batch": device.budgets.batch_size, "optimizer": plan.optimizer, "lr": config.lr,
                              "lora_scale": config.lora_scale})
        return tasks, idle

    def finish(self, round_index: int, records: list[dict], updates: dict[str, dict[str, torch.Tensor]],
               started: float) -> dict:
        """Aggregate this round's replies (device -> arrays, `trainer.server`), evaluate, record and
        checkpoint; the metrics row.

        ``records`` holds one record per sampled device (trained, sat out, dropped or failed)."""
        records = sorted(records, key=lambda r: r["order"])
        samples = {r["device"]: r["samples"] for r in records if r["status"] == "trained"}
        contributions, rejected = collect([(r["device"], updates[r["device"]], r.get("lora_scale"),
                                            samples[r["device"]]) for r in records if r["device"] in updates],
                                          self.state)
        self.state = aggregate(self.state, contributions)
        evaluated = time.perf_counter()
        if round_index % self.config.eval_every == 0 or round_index == self.config.rounds:
            loss, accuracy = evaluate(self.spec, self.state, self.test, self.config.eval_samples)
        else:
            loss = accuracy = None
        unseen = {}
        if round_index == self.config.rounds and self.config.eval_split == "test":  # clients nobody trains on
            unseen_loss, unseen_accuracy = evaluate(self.spec, self.state, evaluation_set(
                get_task(self.config.task), "unseen"), self.config.eval_samples)
            unseen = {"unseen_loss": unseen_loss, "unseen_accuracy": unseen_accuracy}
        evaluated = time.perf_counter() - evaluated
        self.metrics.append({
            "round": round_index, "method": self.config.method, "model": self.spec.name, "test_loss": loss,
            "test_accuracy": accuracy, **unseen, "uploaded_bytes": sum(r.get("upload_bytes", 0) for r in records),
            "downloaded_bytes": sum(r.get("download_bytes", 0) for r in records),
            "flops": sum(r.get("flops", 0) for r in records), "clients": records, "rejected": rejected,
            "trained_tensors": len(contributions), "eval_seconds": evaluated, "seconds": time.perf_counter() - started,
            "client_seconds": sum(r.get("seconds", 0.0) for r in records)})
        save_round(self.out, self.config, self.plan_sha256, self.state, self.metrics)
        return self.metrics[-1]


def task_record(task: dict, **fields) -> dict:
    """A device's metrics record for this round: who it is and what it ran, plus ``fields``."""
    return {key: task[key] for key in ("device", "order", "memory_budget_bytes", "mode", "held_blocks")
            if key in task} | fields


_MEASURED: dict[tuple, tuple[int, int]] = {}  # (spec, mode, batch, steps) -> (FLOPs, peak bytes), per process


def task_model(task: dict) -> tuple[ModelSpec, TrainMode, list[int] | None]:
    """(the spec of the model the device of ``task`` runs, its mode, the global blocks that model holds
    in order, or None: all of them, in place)."""
    spec, held = ModelSpec.model_validate_json(task["spec"]), task.get("held_blocks")
    if held is not None:  # FedRA: a shallow model of only these blocks, in order
        spec = shallow_spec(spec, len(held))
    return spec, TrainMode.parse(task["mode"], spec.n_blocks), held


def received_arrays(task: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global arrays a device is sent for ``task``: all of them (its plan runs the whole forward
    pass), or for a FedRA device only the blocks its shallow model holds, with embeddings and head.
    A plan with ``frozen:bf16|int8`` gets its compact linears compact (`costmodel.compact.compact_state`):
    the form its model holds them in, so the device never holds them in full precision."""
    spec, mode, held = task_model(task)
    if held is None:
        return compact_state(state, spec, mode)
    shallow = compact_state(renumber_blocks(state, {g: i for i, g in enumerate(held)}), spec, mode)
    return renumber_blocks(shallow, dict(enumerate(held)))


def client_shard(task: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The training samples (inputs, targets) of the device of ``task``: its share of the task's data."""
    return device_client(task["task"], task["seed"], task["n_devices"], task["index"]).train


def train_client(task: dict, received: dict[str, torch.Tensor],
                 shard: tuple[torch.Tensor, torch.Tensor] | None = None,
                 measured: MutableMapping[tuple, tuple[int, int]] = _MEASURED) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run one device's task on its own data (``shard``, default `client_shard`) from the arrays it
    ``received`` (`received_arrays`): (its record, its reply: what it trained, as trained, LoRA as
    factors, under global names).

    The record holds the wire bytes (`costmodel.wire`) of the reply (``upload_bytes``) and of what
    it received (``download_bytes``), the LoRA factors' scale, and the predicted process memory
    (``process_bytes``, ``process_memory: "predicted"``; a Flower node replaces them with its
    process's measured figures). A mode is measured the first time it is trained at given shapes;
    the same mode at the same shapes has the same FLOPs and live bytes, so later runs reuse those
    figures from ``measured`` ((spec, mode, batch, steps) -> (FLOPs, peak bytes); default: this
    process's; a Flower node keeps its own on disk)."""
    spec, mode, held = task_model(task)
    state = received if held is None else renumber_blocks(received, {g: i for i, g in enumerate(held)})
    seed, round_index, name = task["seed"], task["round"], task["device"]
    shard = shard or client_shard(task)
    stream = _batch_stream(*shard, task["batch"], _seed(seed, round_index, name, "batches"))
    key = (spec.model_dump_json(), task["mode"], task["batch"], task["steps"])
    check_fits(spec, mode, task["batch"], TASK_SEQ[task["task"]], task["optimizer"],
               budget_bytes=task["memory_budget_bytes"])  # refuse, before the step, what cannot fit
    result = local_train(state, spec, mode, stream, task["steps"], task["optimizer"], task["lr"],
                         seed=_seed(seed, round_index, name, "init"), measure=key not in measured,
                         lora_scale=task["lora_scale"])
    result.flops, result.peak_bytes = measured.setdefault(key, (result.flops, result.peak_bytes))
    reply = result.update if held is None else renumber_blocks(result.update, dict(enumerate(held)))
    predicted = estimate(spec, mode, task["batch"], TASK_SEQ[task["task"]], task["optimizer"])
    totals = predicted.totals
    process = process_memory(load_runtime(task.get("runtime") or DEFAULT_RUNTIME), mode, predicted,
                             sum(t.numel() * t.element_size() for t in shard),  # a bound: windows may overlap
                             kept_bytes(spec, mode, predicted))
    scales = set(result.lora_scales.values())  # alpha = lora_scale x rank: one scale for every adapter
    if len(scales) > 1:
        raise ValueError(f"LoRA adapters of one device with different scales {sorted(scales)}")
    record = task_record(
        task, status="trained", samples=result.n_samples, loss=result.loss, upload_bytes=wire_bytes(reply),
        predicted_upload_bytes=totals["upload_bytes"], download_bytes=wire_bytes(received), flops=result.flops,
        predicted_flops=task["steps"] * (totals["fwd_flops"] + totals["bwd_flops"]), peak_bytes=result.peak_bytes,
        predicted_peak_bytes=predicted.peak_bytes, predicted_process_bytes=process.total_bytes,
        process_bytes=process.total_bytes, process_memory="predicted", seconds=result.seconds) | ({"lora_scale": scales.pop()} if scales else {})
    return record, reply


def run(config: TrainConfig, plan: PlanFile, out: str | Path, resume: bool = False,
        progress=lambda clients: None) -> list[dict]:
    """Run (or resume) a federated run in this process and return its per-round metrics.

    ``progress(n)`` is called as n more sampled devices are done (trained, sat out or dropped)."""
    server = Server(config, plan, out, resume)
    total_seconds = time.perf_counter()
    for round_index in range(server.first_round, config.rounds + 1):
        started = time.perf_counter()
        tasks, records = server.tasks(round_index)
        progress(len(records))
        updates = {}
        for task in tasks:
            record, updates[task["device"]] = train_client(task, received_arrays(task, server.state))
            records.append(record)
            progress(1)
        server.finish(round_index, records, updates, started)
    server.metrics[-1]["total_seconds"] = time.perf_counter() - total_seconds
    return server.metrics


def _architecture(config: TrainConfig, plan: PlanFile) -> ModelSpec:
    if config.method == "smallest":
        spec = smallest_common_architecture(plan)
        if spec is None:
            raise ValueError("smallest: no candidate architecture can be trained fully by every device")
        return spec
    if plan.winner is None:
        raise ValueError("the plan file has no winning architecture (see its architecture summaries)")
    spec = plan.spec(plan.winner)
    if spec.kind != TASK_KIND[config.task]:
        raise ValueError(f"task {config.task} needs a {TASK_KIND[config.task]} model; the plan's is {spec.kind}")
    return spec


def planned_for(config: TrainConfig, plan: PlanFile) -> PlanFile:
    """``plan`` if it was made for this run's settings; with ``--local-steps``, the plan re-checked
    at those steps (every device's budgets say them, so each method's choice re-checks compute; a
    caff device whose planned mode would exceed its compute budget refuses the run)."""
    if not plan.devices:
        raise ValueError("the plan has no devices")
    seq = TASK_SEQ[config.task]
    if seq is not None and plan.seq is not None and plan.seq != seq:
        raise ValueError(f"the plan was made for {plan.seq} tokens per sample; {config.task}'s samples have {seq}: "
                         f"re-plan with --seq {seq}")
    steps = config.local_steps
    if steps is None:
        return plan
    for device in plan.devices:
        if config.method == "caff" and device.status == "optimal":
            per_step = device.flops_per_round / device.budgets.local_steps
            if steps * per_step > device.budgets.compute_flops:
                raise ValueError(f"--local-steps {steps}: device {device.device}'s planned mode {device.mode} would "
                                 f"need {steps * per_step:.4g} FLOP per round, over its "
                                 f"{device.budgets.compute_flops:.4g} budget (it allows "
                                 f"{int(device.budgets.compute_flops // per_step)} steps); re-plan with these steps")
    return plan.model_copy(update={"devices": [
        d.model_copy(update={"budgets": d.budgets.model_copy(update={"local_steps": steps})}) for d in plan.devices]})


def _start(config: TrainConfig, plan_sha256: str, spec: ModelSpec, out: Path, resume: bool,
           checkpoints: str | Path | None):
    """(global weights, first round, metrics so far): the checked run in ``out``, or a new one."""
    saved = load_run(config, plan_sha256, spec, out, resume)
    if saved is not None:
        return saved
    out.mkdir(parents=True, exist_ok=True)
    return initial_state(config.task, spec, config.pretrained, checkpoints), 1, []
