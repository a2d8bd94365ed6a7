"""Bytes of tensors on the wire, as caff sends them through Flower (1.42): packed into one uint8
array (`profiles.packing`: safetensors' header, then the data) under one key of an ``ArrayRecord``;
and the bound the cost model budgets per trained tensor.

Flower sends a record as content-addressed objects (``flwr.supercore.inflatable``). Each array
is saved as ``.npy`` (numpy's header, then the data) and cut into 5 MiB chunks. Every object is
a head ``"Type child-ids body-length"``, a zero byte and a body: a chunk's body is its bytes, an
array's is JSON of its dtype, shape and chunk indices, the record's is JSON mapping names to
array ids. Ids are SHA-256 hex digests (64 characters), and an object that occurs twice (two
equal chunks or arrays) crosses once. gRPC framing and TLS come on top and are not counted.

`wire_bytes` computes that size exactly, without Flower (the in-process engine reports it; a test
compares it with Flower's own objects). `array_wire_bound` is what the estimate charges per
trained tensor: its bytes plus at most ``PER_ARRAY`` bytes of overhead (a bound from the layout of
one array per tensor, which it also bounds: npy header, object heads, JSON, the record's entry;
packed, a tensor adds its safetensors header entry and padding, and the one packed array's npy
header and objects are shared), which holds for names of up to 128 characters and shapes of up to
4 dimensions, and ``PER_CHUNK`` per further 5 MiB chunk. tests/test_wire.py checks both layouts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import torch

from profiles.packing import PACKED, pack, unpack

CHUNK = 5 * 2**20  # Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE default
ID = 64  # a SHA-256 hex digest
NPY_HEADER = 128  # numpy's .npy header (format 1.0) for shapes of up to 4 dimensions
PER_ARRAY = 640
PER_CHUNK = 96


def _object(kind: str, children: int, body: int) -> int:
    """Bytes of one deflated object: head, zero byte, body."""
    ids = children * ID + max(children - 1, 0)
    return len(f"{kind}  {body}") + ids + 1 + body


def pack_state(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """A state dict as the one uint8 array that crosses (`profiles.packing.pack`)."""
    return pack({name: t.detach().cpu().contiguous().numpy() for name, t in tensors.items()})


def unpack_state(packed: np.ndarray | bytes | bytearray) -> dict[str, torch.Tensor]:
    """The state dict `pack_state` packed (bit for bit)."""
    return {name: torch.from_numpy(array) for name, array in unpack(packed).items()}


def wire_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of ``tensors`` as caff sends them: packed (`pack_state`) as the one array of a Flower ``ArrayRecord``."""
    return record_bytes({PACKED: pack_state(tensors)})


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` sent as one Flower ``ArrayRecord`` of those arrays: every distinct object, deflated."""
    chunks: dict[bytes, int] = {}  # digest -> deflated bytes, over the whole record
    objects: dict[tuple, int] = {}  # (dtype, shape, chunk digests) -> deflated bytes of the Array
    names = {}
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = memoryview(buffer.getvalue())
        digests = [hashlib.sha256(data[s:s + CHUNK]).digest() for s in range(0, len(data), CHUNK)]
        for start, digest in zip(range(0, len(data), CHUNK), digests):
            chunks[digest] = _object("ArrayChunk", 0, len(data[start:start + CHUNK]))
        unique = list(dict.fromkeys(digests))
        body = json.dumps({"dtype": str(array.dtype), "shape": list(array.shape), "stype": "numpy.ndarray",
                           "arraychunk_ids": [unique.index(d) for d in digests]})
        key = (str(array.dtype), array.shape, tuple(digests))
        objects[key] = _object("Array", len(unique), len(body.encode()))
        names[name] = key
    record = json.dumps({name: "0" * ID for name in names})
    return _object("ArrayRecord", len(objects), len(record.encode())) + sum(objects.values()) + sum(chunks.values())


def array_wire_bound(nbytes: int) -> int:
    """At least the wire bytes of one array of ``nbytes`` data bytes in a record (see the module doc)."""
    return nbytes + PER_ARRAY + PER_CHUNK * (math.ceil((nbytes + NPY_HEADER) / CHUNK) - 1)
