"""A device's data shard in a file, with the storage layout its loader gave it.

A task's loader returns tensors that may be views over one storage (Shakespeare's inputs and
targets are windows over one id tensor). `save_shard` writes each distinct storage once, as
raw bytes, after a one-line JSON header with every tensor's dtype, shape, strides and offset
into its storage; `load_shard` reads the storages back and rebuilds the same views. So a node
that reads its shard holds exactly the bytes the loader's tensors address (what the plan's
process memory counts) and trains on the same values. Bytes throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from profiles.atomic import atomic_write

FORMAT = "caff-shard-1"
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                                      torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def save_shard(path: str | Path, tensors: tuple[torch.Tensor, ...]) -> None:
    """Write ``tensors`` (CPU) and the storages they view to ``path``, atomically."""
    storages, views = {}, []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        index = storages.setdefault(storage.data_ptr(), (len(storages), storage))[0]
        views.append({"storage": index, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                      "stride": list(tensor.stride()), "offset": tensor.storage_offset()})
    raw = [bytes(storage) for _, storage in storages.values()]
    header = {"format": FORMAT, "storages": [len(r) for r in raw], "views": views}
    atomic_write(path, json.dumps(header).encode() + b"\n" + b"".join(raw))


def load_shard(path: str | Path) -> tuple[torch.Tensor, ...]:
    """The tensors `save_shard` wrote, as views over one fresh storage per saved storage.
    ValueError if the file is not a whole shard file."""
    with open(path, "rb") as file:
        try:
            header = json.loads(file.readline())
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        storages = []
        for nbytes in header["storages"]:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            if file.readinto(buffer.numpy()) != nbytes:
                raise ValueError(f"{path}: truncated")
            storages.append(buffer.untyped_storage())
    return tuple(torch.empty(0, dtype=DTYPES[v["dtype"]]).set_(storages[v["storage"]], v["offset"], v["shape"],
                                                               v["stride"]) for v in header["views"])
