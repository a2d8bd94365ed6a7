"""What compact frozen weights save: one step's tensor peak with frozen linear weights in the model's
fp32, in bf16 and in int8, predicted (`costmodel.estimate`) and measured (`costmodel.measure`: live
tensor bytes of a real step), for head-only and last-block training.

    python bench/compact_frozen.py [--optimizer sgd] [--accuracy]

Shapes: char-gpt-xs at batch 8 x 80 characters (Shakespeare), minilm-l6 at batch 8 x 64 tokens (fortunes).
``--accuracy``: instead, what holding every block's weights compact costs the pretrained char-gpt-xs
checkpoint on the Shakespeare task's test set (loss per character, nats, and accuracy).
"""

import argparse
import warnings

import torch

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate, measure
from profiles import format_bytes

CASES = (("char-gpt-xs", 8, 80), ("minilm-l6", 8, 64))
FORMATS = ("", "+frozen:bf16", "+frozen:int8")


def accuracy() -> None:
    from trainer.engine import initial_state
    from trainer.tasks import get_task
    from trainer.tasks.base import evaluation_set

    spec = ZOO["char-gpt-xs"]
    state = initial_state("shakespeare", spec, pretrained=True)
    x, y = evaluation_set(get_task("shakespeare"), "test")
    print(f"pretrained char-gpt-xs on the Shakespeare test set ({len(x)} windows of {x.shape[1]} characters)")
    for fmt in FORMATS:
        model = build_model(spec)
        model.load_state_dict(state)
        model = apply_mode(model, TrainMode.parse("head" + fmt, spec.n_blocks))
        with torch.no_grad():
            logits = torch.cat([model.head(model.features(x[s:s + 64])) for s in range(0, len(x), 64)])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        hits = (logits.argmax(-1) == y).float()
        print(f"blocks' weights in {fmt.rpartition(':')[2] or spec.dtype}: loss {loss:.5f} nats/char, "
              f"accuracy {hits.mean():.5f}")


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    parser.add_argument("--accuracy", action="store_true", help="test-set cost of compact weights instead")
    args = parser.parse_args()
    if args.accuracy:
        return accuracy()
    print("| model | batch x seq | trains | frozen weights | weights | peak predicted | peak measured | error |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name, batch, seq in CASES:
        spec = ZOO[name]
        for trains in ("head", "last:1"):
            for fmt in FORMATS:
                mode = TrainMode.parse(trains + fmt, spec.n_blocks)
                report = estimate(spec, mode, batch, seq, args.optimizer)
                measured = measure(spec, mode, batch, seq, args.optimizer).peak_bytes
                print(f"| {name} | {batch} x {seq} | {trains} | {fmt.rpartition(':')[2] or spec.dtype} | "
                      f"{format_bytes(report.totals['param_bytes'])} | {format_bytes(report.peak_bytes)} | "
                      f"{format_bytes(measured)} | {report.peak_bytes / measured - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
