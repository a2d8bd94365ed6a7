"""``caff calibrate``: measure this machine's runtime footprint and write a runtime profile."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def add_parser(subparsers) -> dict:
    p = subparsers.add_parser("calibrate", help="measure this machine's runtime footprint (a runtime profile)")
    p.add_argument("-o", "--output", required=True, help="runtime profile JSON to write; a device names it as runtime")
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.add_argument("--repetitions", type=int, default=5, help="fresh processes measured; the maximum counts (default 5)")
    p.add_argument("--machine", default=None, help="describe the board (default: platform's machine and OS)")
    return {"calibrate": run}


def run(args) -> int:
    from profiles import format_bytes
    from trainer.calibrate import calibrate

    out = Path(args.output)
    if not out.parent.is_dir():
        raise ValueError(f"--output: folder {out.parent} does not exist")
    profile = calibrate(args.name or out.stem, args.repetitions, args.machine)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(profile.model_dump_json(indent=1) + "\n")
    os.replace(temporary, out)
    print(f"runtime footprint {format_bytes(profile.footprint_bytes)} (+{format_bytes(profile.lora_bytes)} with LoRA), "
          f"max of {args.repetitions} processes; written to {out}")
    return 0
