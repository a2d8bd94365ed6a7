"""``caff cost``: the analytic cost of one training step, per layer, optionally measured."""

from __future__ import annotations

import json
from pathlib import Path

from costmodel import TrainMode, estimate, load_spec, measure
from costmodel.hf import measure_hf
from costmodel.process import kept_bytes, process_memory
from profiles import DEFAULT_RUNTIME, load_runtime, parse_bytes


def add_parser(subparsers) -> dict:
    p = subparsers.add_parser("cost", help="per-layer FLOPs and bytes of one training step")
    p.add_argument("model", help="zoo name, spec JSON file, or Hugging Face model directory")
    p.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--train", default="all", help="all | head | last:K | blocks:i,j | lora:R | emb | recompute:i,j (trained blocks that re-run their forward in backward) | frozen:bf16|int8 (frozen linear weights held compact), mixed with '+'")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="override the model's dtype")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, help=f"runtime profile: name or .json (default {DEFAULT_RUNTIME})")
    p.add_argument("--shard-bytes", default="0", help="training data the device holds, e.g. 2MiB (default 0)")
    p.add_argument("--measure", action="store_true", help="also run a real step on the CPU and compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return {"cost": run}


def run(args) -> int:
    spec = load_spec(args.model)
    if args.dtype:
        spec = spec.model_copy(update={"dtype": args.dtype})
    mode = TrainMode.parse(args.train, spec.n_blocks)
    report = estimate(spec, mode, args.batch, args.seq, args.optimizer)
    out = report.to_json()
    try:
        shard = parse_bytes(args.shard_bytes)
    except ValueError as exc:
        raise ValueError(f"--shard-bytes: {exc}") from None
    process = process_memory(load_runtime(args.runtime), mode, report, shard, kept_bytes(spec, mode, report))
    out["process"] = {"runtime": args.runtime, **process.to_json()}
    if mode.frozen:  # what holding frozen weights compact saves, against the same mode in full precision
        plain = estimate(spec, mode.model_copy(update={"frozen": None}), args.batch, args.seq, args.optimizer)
        out["full_precision_frozen"] = {"param_bytes": plain.totals["param_bytes"], "peak_bytes": plain.peak_bytes}
    if args.measure:
        if Path(args.model).is_dir():  # the real transformers model, pretrained weights and all
            measured = measure_hf(spec, mode, args.batch, args.seq, args.optimizer, model_dir=args.model)
        else:
            measured = measure(spec, mode, args.batch, args.seq, args.optimizer)
        out["measured"] = {"total": measured.total(), "layers": measured.layers,
                           "relative_error": {k: _relative(out["total"][k], v) for k, v in measured.total().items()
                                              if k in out["total"]}}
        if measured.fvcore_fwd_flops is not None:
            out["measured"]["fvcore_fwd_flops"] = measured.fvcore_fwd_flops
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(out)
    return 0


def _relative(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float(predicted != measured)


def _print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from profiles import format_bytes, format_flops

    columns = [("fwd_flops", format_flops), ("bwd_flops", format_flops), ("activation_bytes", format_bytes),
               ("param_bytes", format_bytes), ("grad_bytes", format_bytes), ("optimizer_bytes", format_bytes),
               ("upload_bytes", format_bytes)]
    measured = out.get("measured", {}).get("layers", {})
    title = (f"{out['model']}  train={out['train']}  batch={out['batch']} seq={out['seq']} "
             f"optimizer={out['optimizer']} dtype={out['dtype']}")
    table = Table(title=title)
    table.add_column("layer")
    for key, _ in columns:
        table.add_column(key.replace("_", " "), justify="right")
    for layer in out["layers"]:
        row = [fmt(layer[key]) for key, fmt in columns]
        if layer["name"] in measured:
            seen = measured[layer["name"]]
            row[2] += f" ({format_bytes(seen['activation_bytes'])})"
        table.add_row(layer["name"], *row)
    total = out["total"]
    table.add_row("total", *[fmt(total[key]) for key, fmt in columns], style="bold")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print(f"peak memory of one step: {format_bytes(total['peak_bytes'])} (at {out['peak_phase']}); "
                  f"elementwise FLOPs not counted above: {format_flops(total['elementwise_flops'])}")
    if "full_precision_frozen" in out:
        plain = out["full_precision_frozen"]
        console.print(f"frozen weights in {out['train'].rsplit(':', 1)[1]}: weights {format_bytes(total['param_bytes'])}, "
                      f"peak {format_bytes(total['peak_bytes'])}; in {out['dtype']}: weights "
                      f"{format_bytes(plain['param_bytes'])}, peak {format_bytes(plain['peak_bytes'])} "
                      f"(saves {format_bytes(plain['peak_bytes'] - total['peak_bytes'])} of the peak)")
    p = out["process"]
    console.print(f"predicted process memory: {format_bytes(p['total_bytes'])} = runtime {p['runtime']} "
                  f"{format_bytes(p['runtime_bytes'])} + tensor peak {format_bytes(p['tensor_peak_bytes'])} + allocator "
                  f"slack {format_bytes(p['allocator_bytes'])} + data "
                  f"shard {format_bytes(p['shard_bytes'])} + received tensors kept {format_bytes(p['kept_bytes'])}")
    if "measured" in out:
        seen, errors = out["measured"]["total"], out["measured"]["relative_error"]
        for key in ("fwd_flops", "bwd_flops", "activation_bytes", "peak_bytes"):
            fmt = format_flops if "flops" in key else format_bytes
            console.print(f"measured {key}: {fmt(seen[key])}  predicted {fmt(total[key])}  "
                          f"error {errors[key]:+.2%}")
        if "fvcore_fwd_flops" in out["measured"]:
            console.print(f"fvcore forward FLOPs (a second counter; blind to SDPA attention and elementwise ops): "
                          f"{format_flops(out['measured']['fvcore_fwd_flops'])}  predicted "
                          f"{format_flops(total['fwd_flops'])}")
