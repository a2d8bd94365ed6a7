"""The one reader of the JSON files people give caff (devices, fleets, model specs, plan files).

It bounds what a file may cost before anything is built from it: at most ``max_bytes`` are read,
the text must be UTF-8 (the error names the line of the first bad byte), and pydantic-core's parser
refuses nesting deeper than 200 levels, NaN and infinity; every error is a ValueError of one line
naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pydantic_core

MiB = 2**20
MAX_BYTES = {"device": 1 * MiB, "model spec": 1 * MiB, "config": 1 * MiB, "runtime": 1 * MiB, "fleet": 64 * MiB,
             "plan": 512 * MiB}


def read_json(path: str | Path, what: str) -> object:
    """The JSON value in ``path``, a ``what`` file (a key of MAX_BYTES, which bounds its size)."""
    limit = MAX_BYTES[what]
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise ValueError(f"{path}: a {what} file may hold at most {limit // MiB} MiB; this one holds more")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); "
                         f"save the {what} file as UTF-8") from None
    try:
        return pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON {what} file: {exc}") from None


def read_json_object(path: str | Path, what: str) -> dict:
    """`read_json`, for files that must hold one JSON object."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} file holds a JSON object, not a {type(data).__name__}")
    return data
