"""transformers' GPT-2, built from config.json fields, against the estimate: saved bytes, FLOPs, peak.

For each configuration prints one Markdown row: saved activation bytes (bytes) as estimated (and as
estimated without GPT-2's layout: no key-value cache copies, position ids or shifted labels, the estimate
before these were modelled), as measured by saved-tensor hooks; forward + backward FLOPs estimated and
counted by FlopCounterMode; peak estimated and measured (live tensor bytes).

    python bench/hf_gpt2.py
"""

import warnings

from costmodel import TrainMode, estimate
from costmodel.hf import measure_hf, spec_from_hf_config
from profiles import format_bytes

# (n_layer, n_embd, n_head, train, batch, seq, attn_implementation, use_cache, resid_pdrop)
CASES = [
    (1, 64, 4, "all", 3, 20, "sdpa", True, 0.1),
    (5, 64, 4, "all", 3, 20, "sdpa", True, 0.1),
    (5, 64, 4, "all", 3, 20, "sdpa", False, 0.1),
    (5, 64, 4, "all", 3, 20, "eager", True, 0.0),
    (5, 128, 4, "last:2", 8, 32, "sdpa", True, 0.1),
    (4, 128, 4, "head", 1, 64, "sdpa", True, 0.1),
    (3, 96, 6, "blocks:0,2", 4, 48, "sdpa", True, 0.1),
    (5, 128, 8, "lora:8", 4, 64, "sdpa", True, 0.1),
]

LAYOUT = ("kv_cache", "position_lookup", "shift_labels")


def main() -> None:
    warnings.filterwarnings("ignore")
    print("| n_layer x n_embd | attention | use_cache | `--train` | batch x seq | saved, estimate without the layout "
          "| saved, estimate | saved, hooks | FLOPs estimate | FLOPs counted | peak estimate | peak measured (error) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n_layer, width, heads, train, batch, seq, attention, use_cache, dropout in CASES:
        config = dict(model_type="gpt2", n_layer=n_layer, n_embd=width, n_head=heads, n_positions=128,
                      vocab_size=1000, resid_pdrop=dropout, use_cache=use_cache)
        spec = spec_from_hf_config(config).model_copy(update={"attention": "sdpa" if attention == "sdpa" else "matmul"})
        mode = TrainMode.parse(train, n_layer)
        report, measured = estimate(spec, mode, batch, seq), measure_hf(spec, mode, batch, seq)
        before = estimate(spec.model_copy(update=dict.fromkeys(LAYOUT, False)), mode, batch, seq)
        cells = [f"{n_layer} x {width}", attention, str(use_cache), f"`{train}`", f"{batch} x {seq}",
                 f"{before.totals['activation_bytes']:,}", f"{report.totals['activation_bytes']:,}",
                 f"{measured.activation_bytes:,}", f"{report.totals['fwd_flops'] + report.totals['bwd_flops']:,}",
                 f"{measured.fwd_flops + measured.bwd_flops:,}", format_bytes(report.peak_bytes),
                 f"{format_bytes(measured.peak_bytes)} ({report.peak_bytes / measured.peak_bytes - 1:+.2%})"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
