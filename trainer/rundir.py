"""A run directory: what ``caff train --out DIR`` writes, and the checks before it resumes or starts.

After each round the server writes, each file atomically and durably (`profiles.atomic`):
``metrics.jsonl`` (one JSON line per round so far), ``global-<r>.safetensors`` (the global
weights after round r), then ``state.json``, the commit point. ``state.json`` holds the round,
the configuration, the SHA-256 of the plan the run executes, and an integrity record of the two
other files: the weights' size and SHA-256, and the size and SHA-256 of the first ``bytes`` of
the metrics (a crash after the metrics and before ``state.json`` leaves a longer metrics file,
which a resume cuts back). Weights of earlier rounds are deleted once a newer ``state.json`` is
committed.

`load_run` refuses, in one line naming the file and what is wrong: a directory holding results
but no ``state.json`` (it never deletes or overwrites results it did not create), a run there
without ``--resume``, a ``state.json`` of the wrong shape, another configuration or plan, a round
past the run's end, weights or metrics that differ from their record, tensors that do not fit
the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from costmodel import ModelSpec, build_model
from planner.planfile import PlanFile
from profiles import one_line_validation_error
from profiles.atomic import atomic_write

STATE_FORMAT = 2


class FileRecord(BaseModel):
    """A file of the run directory as committed: its name, size (bytes) and SHA-256 of those bytes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: StrictStr = Field(pattern=r"^[\w.-]+$")
    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern="^[0-9a-f]{64}$")


class RunState(BaseModel):
    """``state.json``: the last committed round and what it committed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal[2]
    round: StrictInt = Field(ge=1)
    config: dict
    plan_sha256: StrictStr = Field(pattern="^[0-9a-f]{64}$")
    weights: FileRecord
    metrics: FileRecord


def plan_digest(plan: PlanFile) -> str:
    """SHA-256 of what a plan makes devices do (solver timings left out, so a re-plan matches)."""
    fields = plan.model_dump(mode="json", exclude={"devices": {"__all__": {"solver_seconds"}}})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _record(path: Path, data: bytes) -> FileRecord:
    return FileRecord(file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def save_round(out: Path, config: BaseModel, plan_sha256: str, state: dict[str, torch.Tensor],
               metrics: list[dict]) -> None:
    """Commit a round: the metrics, the weights, then ``state.json`` recording both; then drop older weights."""
    from safetensors.torch import save

    round_index = metrics[-1]["round"]
    rows = "".join(json.dumps(m) + "\n" for m in metrics).encode()
    weights = save({k: v.contiguous().clone() for k, v in state.items()})  # tied tensors apart
    metrics_path = atomic_write(out / "metrics.jsonl", rows)
    weights_path = atomic_write(out / f"global-{round_index}.safetensors", weights)
    record = RunState(format=STATE_FORMAT, round=round_index, config=config.model_dump(), plan_sha256=plan_sha256,
                      weights=_record(weights_path, weights), metrics=_record(metrics_path, rows))
    atomic_write(out / "state.json", record.model_dump_json())
    for old in out.glob("global-*.safetensors"):
        if old.name != weights_path.name:
            old.unlink()


def _differences(mine: dict, theirs: dict) -> str:
    keys = sorted(set(mine) | set(theirs), key=lambda k: (k not in mine, k))
    return ", ".join(f"{k} {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in keys if mine.get(k) != theirs.get(k))


def _read_state(out: Path) -> RunState:
    path = out / "state.json"
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); the run there cannot be resumed") from None
    if isinstance(data, dict) and "round" in data and "format" not in data:
        raise ValueError(f"{path}: written by an older caff, without an integrity record; "
                         "it cannot be resumed: choose another --out")
    try:
        return RunState.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: not a caff run state ({one_line_validation_error(exc)})") from None


def _verified(out: Path, record: FileRecord, prefix: bool = False) -> bytes:
    """The bytes of a recorded file (its first ``record.bytes`` when ``prefix``), checked against the record."""
    path = out / record.file
    if not path.is_file():
        raise ValueError(f"{path}: missing; state.json records it")
    data = path.read_bytes()
    if len(data) < record.bytes or (len(data) != record.bytes and not prefix):
        raise ValueError(f"{path}: {len(data)} bytes, state.json records {record.bytes} (truncated or replaced)")
    data = data[:record.bytes]
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"{path}: SHA-256 differs from the one state.json records (the file is corrupted)")
    return data


def _weights(out: Path, record: FileRecord, spec: ModelSpec) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = out / record.file
    try:
        state = load(_verified(out, record))
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    with torch.device("meta"):
        expected = build_model(spec).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if (state[k].shape, state[k].dtype) != (expected[k].shape, expected[k].dtype))
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", wrong)):
        if names:
            raise ValueError(f"{path}: tensors do not fit {spec.name}: {label} {', '.join(names[:3])}"
                             f"{' ...' if len(names) > 3 else ''}")
    return state


def _metrics(out: Path, record: FileRecord, rounds: int) -> list[dict]:
    path = out / record.file
    try:
        rows = [json.loads(line) for line in _verified(out, record, prefix=True).decode().splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if [row.get("round") if isinstance(row, dict) else None for row in rows] != list(range(1, rounds + 1)):
        raise ValueError(f"{path}: holds {len(rows)} rounds, state.json says {rounds}")
    return rows


def load_run(config: BaseModel, plan_sha256: str, spec: ModelSpec | None, out: str | Path, resume: bool):
    """(global weights, next round, metrics so far) of the run in ``out``, checked; None for a new run.

    ``spec=None`` checks everything but the weights (before an engine that loads them later)."""
    out = Path(out)
    if not (out / "state.json").exists():
        results = sorted(p.name for p in (out.glob("global-*.safetensors") if out.is_dir() else ()))
        results += ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
        if results:
            raise ValueError(f"{out} holds results ({', '.join(results[:3])}) but no state.json to resume from; "
                             "caff will not overwrite them: move them away or choose another --out")
        return None
    if not resume:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    saved = _read_state(out)
    if saved.config != config.model_dump():
        raise ValueError(f"{out}: --resume with a different configuration than the run there "
                         f"({_differences(config.model_dump(), saved.config)}); "
                         "give the same settings, or choose another --out to start afresh")
    if saved.plan_sha256 != plan_sha256:
        raise ValueError(f"{out}: --resume with a different plan or fleet than the run there (plan SHA-256 "
                         "differs); give the same plan, or choose another --out to start afresh")
    if saved.round > config.rounds:
        raise ValueError(f"{out / 'state.json'}: round {saved.round} of a {config.rounds}-round run")
    metrics = _metrics(out, saved.metrics, saved.round)
    state = None if spec is None else _weights(out, saved.weights, spec)
    return state, saved.round + 1, metrics
