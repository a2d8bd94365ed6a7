"""Model weights on disk: safetensors only (never pickle), written atomically.

A checkpoint is one ``.safetensors`` file whose header metadata holds strings:
``spec`` (the `ModelSpec` as JSON), ``command``, ``seed``, ``steps``, final and
held-out losses, a description of the data, ... (whatever the writer passes;
values that are not strings are stored as JSON).

safetensors refuses tensors that share memory, which tied weights do (a GPT
with ``tied_embeddings`` has one tensor under ``embed.tok.weight`` and
``head.out.weight``). `save_weights` stores such a tensor once and records the
other names in the metadata key ``caff.tied_weights``; `load_weights` puts the
names back, all pointing at one tensor, so ``load_state_dict`` re-fills a tied
model exactly.

The committed checkpoints of the zoo live in ``checkpoints/`` at the repository
root (`CHECKPOINT_DIR`); `load_pretrained` loads one by zoo name, and
``caff pretrain NAME`` (`caff.pretrain_cmd`) makes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from costmodel.build import build_model
from costmodel.modules import TinyTransformer
from costmodel.spec import ZOO, ModelSpec
from profiles.atomic import atomic_write

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
TIED_KEY = "caff.tied_weights"

__all__ = ["CHECKPOINT_DIR", "checkpoint_path", "load_pretrained", "load_weights", "pretrain_command",
           "save_weights", "spec_difference"]


def checkpoint_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of model ``name`` lives: ``<folder or CHECKPOINT_DIR>/<name>.safetensors``."""
    return Path(folder if folder is not None else CHECKPOINT_DIR) / f"{name}.safetensors"


def pretrain_command(name: str, folder: str | os.PathLike | None = None) -> str:
    """The command that makes ``checkpoint_path(name, folder)`` with the committed settings."""
    command = f"caff pretrain {name}"
    if folder is not None and Path(folder).resolve() != CHECKPOINT_DIR:
        command += f" --out {folder}"
    return command


def _metadata_strings(metadata: Mapping) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata key {key!r} is not a string")
        if key == TIED_KEY:
            raise ValueError(f"metadata key {TIED_KEY!r} is reserved")
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts (one per storage, contiguous, owning their memory) and
    the tied names dropped: {dropped name: kept name}."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen:  # the same tensor under a second name: tied
            tied[name] = seen[view]
            continue
        storage = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if not whole or storage in storages:  # a view of, or overlapping, other memory: own copy
            tensor = tensor.contiguous().clone()
        storages.add(storage)
        if tensor.numel():
            seen[view] = name
        kept[name] = tensor
    return kept, tied


def save_weights(path: str | os.PathLike, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                 metadata: Mapping | None = None) -> Path:
    """Write the weights and ``metadata`` (str -> str; other values stored as JSON) to ``path``
    as safetensors, atomically and durably (`profiles.atomic.atomic_write`), so a reader never
    sees half a file. A model with a ``spec`` gets ``metadata["spec"]`` filled in when missing."""
    from safetensors.torch import save

    path = Path(path)
    meta = dict(metadata or {})
    if isinstance(model_or_state_dict, nn.Module):
        spec = getattr(model_or_state_dict, "spec", None)
        if isinstance(spec, ModelSpec):
            meta.setdefault("spec", spec.model_dump_json())
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    strings = _metadata_strings(meta)
    tensors, tied = _dedupe(state)
    if tied:
        strings[TIED_KEY] = json.dumps(tied, sort_keys=True)
    data = save(tensors, metadata=strings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a file `save_weights` wrote; tied names share one tensor."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    tied = json.loads(metadata.pop(TIED_KEY, "{}"))
    for name, source in tied.items():
        if source not in state:
            raise ValueError(f"{path}: tied weight {name!r} points at missing tensor {source!r}")
        state[name] = state[source]
    return state, metadata


def _spec_of(spec_name_or_spec: str | ModelSpec) -> ModelSpec:
    if isinstance(spec_name_or_spec, ModelSpec):
        return spec_name_or_spec
    if spec_name_or_spec not in ZOO:
        raise ValueError(f"unknown model {spec_name_or_spec!r}: not a zoo name ({', '.join(ZOO)})")
    return ZOO[spec_name_or_spec]


def spec_difference(wanted: ModelSpec, recorded: ModelSpec, ignore: tuple[str, ...] = ()) -> str:
    """How ``recorded`` (a checkpoint's spec) differs from ``wanted``, field by field; "" when it does not."""
    mine, theirs = wanted.model_dump(), recorded.model_dump()
    return ", ".join(f"{k}={theirs[k]!r} (wanted {mine[k]!r})" for k in mine if mine[k] != theirs[k] and k not in ignore)


def load_pretrained(spec_name_or_spec: str | ModelSpec, path: str | os.PathLike | None = None) -> TinyTransformer:
    """The pretrained `TinyTransformer` of a zoo name (or spec): the committed
    ``checkpoints/<name>.safetensors`` unless ``path`` is given. Raises a one-line ValueError
    when the file is missing, is not a checkpoint of this spec, or its tensors do not match
    the model's exactly (strict: no missing, unexpected or reshaped tensor)."""
    spec = _spec_of(spec_name_or_spec)
    path = Path(path) if path is not None else checkpoint_path(spec.name)
    command = pretrain_command(spec.name, path.parent) if path.name == f"{spec.name}.safetensors" else \
        f"caff pretrain {spec.name} --out DIR"
    if not path.is_file():
        raise ValueError(f"no pretrained checkpoint for {spec.name} at {path}; make it with: {command}")
    state, metadata = load_weights(path)
    if "spec" not in metadata:
        raise ValueError(f"{path}: checkpoint has no spec in its metadata; remake it with: {command}")
    try:
        saved = ModelSpec(**json.loads(metadata["spec"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable spec is the same error to the user
        raise ValueError(f"{path}: checkpoint spec is unreadable ({' '.join(str(exc).split())[:200]}); "
                         f"remake it with: {command}") from None
    diff = spec_difference(spec, saved)
    if diff:
        raise ValueError(f"{path}: checkpoint is for a different spec: {diff}; remake it with: {command}")
    model = build_model(spec, seed=0)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{label} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
                 if names]
        raise ValueError(f"{path}: tensors do not match {spec.name}: {'; '.join(parts)}; remake it with: {command}")
    model.load_state_dict(state, strict=True)
    return model
