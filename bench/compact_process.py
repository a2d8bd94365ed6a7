"""What compact frozen weights save the whole training process: each plan run as `caff validate` runs
it (`trainer.probe`: a fresh process that receives what the server sends, compact frozen weights
compact, and trains two steps), its peak resident set (VmHWM) and tensor peak measured, against
`costmodel.process`'s prediction with the shipped runtime profile; and the bytes it downloads
(`costmodel.wire`, as Flower serializes them), for frozen linear weights in fp32, bf16 and int8.

    OMP_NUM_THREADS=1 python bench/compact_process.py [--repeat 3]

``--repeat``: fresh processes per plan; the table shows the median measured process peak.
"""

import argparse
import statistics

from costmodel import ZOO, TrainMode, build_model
from costmodel.compact import compact_state
from costmodel.process import predict_process
from costmodel.wire import wire_bytes
from profiles.runtime import DEFAULT_RUNTIME, load_runtime
from trainer.probe import run_probe

CASES = (("minilm-l6", "head", 8, 64), ("minilm-l6", "last:1", 8, 64), ("char-gpt-s", "head", 8, None))
FORMATS = ("", "+frozen:bf16", "+frozen:int8")
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runtime = load_runtime(DEFAULT_RUNTIME)
    print("| model | batch x seq | trains | frozen weights | download | tensor peak predicted | measured "
          "| process predicted | measured | error | process fall predicted | measured |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, train, batch, seq in CASES:
        spec = ZOO[name]
        state = build_model(spec).state_dict()
        base = None
        for fmt in FORMATS:
            mode = TrainMode.parse(train + fmt, spec.n_blocks)
            predicted = predict_process(spec, mode, batch, seq, "sgd", runtime)
            job = {"spec": spec.model_dump_json(), "mode": str(mode), "batch": batch, "seq": seq, "optimizer": "sgd",
                   "steps": 2}
            seen = [run_probe(job) for _ in range(args.repeat)]
            process = statistics.median(s["process_peak_bytes"] for s in seen)
            if base is None:
                base = predicted.total_bytes, process
            fall = f"{(base[0] - predicted.total_bytes) / MiB:.2f} MiB | {(base[1] - process) / MiB:.2f} MiB" if fmt \
                else "| "
            print(f"| {name} | {batch} x {seq or spec.max_seq_len} | {train} | {fmt.split(':')[-1] or 'fp32'} "
                  f"| {wire_bytes(compact_state(state, spec, mode)) / MiB:.2f} MiB "
                  f"| {predicted.tensor_peak_bytes / MiB:.2f} MiB | {seen[0]['tensor_peak_bytes'] / MiB:.2f} MiB "
                  f"| {predicted.total_bytes / MiB:.1f} MiB | {process / MiB:.1f} MiB "
                  f"| {predicted.total_bytes / process - 1:+.1%} | {fall} |", flush=True)


if __name__ == "__main__":
    main()
