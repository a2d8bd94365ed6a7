"""What compact frozen weights save: one step's tensor peak with frozen linear weights in the model's
fp32, in bf16 and in int8, predicted (`costmodel.estimate`) and measured (`costmodel.measure`: live
tensor bytes of a real step), for head-only and last-block training.

    python bench/compact_frozen.py [--optimizer sgd] [--accuracy]

Shapes: char-gpt-xs at batch 8 x 80 characters (Shakespeare), minilm-l6 at batch 8 x 64 tokens (fortunes).
``--accuracy``: instead, what holding frozen weights compact costs the pretrained char-gpt-xs
checkpoint on the Shakespeare task's test set (loss per character, nats, and accuracy): with every
block's weights compact, as is; and after fine-tuning its last block and head with `local_train`
(SGD, ``--steps`` steps of batch 16 from the pooled training windows of 20 clients, 3 seeds) with
the three frozen blocks in fp32 or in int8, the result evaluated as the server would, in fp32.
"""

import argparse
import warnings

import torch

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate, measure

CASES = (("char-gpt-xs", 8, 80), ("minilm-l6", 8, 64))
FORMATS = ("", "+frozen:bf16", "+frozen:int8")


def accuracy(steps: int, lr: float) -> None:
    from trainer.engine import _batch_stream, initial_state
    from trainer.local import local_train
    from trainer.tasks import get_task
    from trainer.tasks.base import device_client_names, evaluation_set

    spec = ZOO["char-gpt-xs"]
    state = initial_state("shakespeare", spec, pretrained=True)
    x, y = evaluation_set(get_task("shakespeare"), "test")
    print(f"pretrained char-gpt-xs on the Shakespeare test set ({len(x)} windows of {x.shape[1]} characters)")
    for fmt in FORMATS:
        model = build_model(spec)
        model.load_state_dict(state)
        loss, hits = _test(apply_mode(model, TrainMode.parse("head" + fmt, spec.n_blocks)), x, y)
        print(f"blocks' weights in {fmt.rpartition(':')[2] or spec.dtype}: loss {loss:.5f} nats/char, "
              f"accuracy {hits:.5f}")
    task = get_task("shakespeare")
    clients = [c.train for c in task.load_clients(device_client_names(task, 0, 20))]
    pooled = tuple(torch.cat([c[i] for c in clients]) for i in (0, 1))
    print(f"fine-tuned last:1 ({steps} SGD steps, lr {lr}, batch 16, {len(pooled[0])} training windows), "
          "evaluated in fp32")
    for seed in range(3):
        found = []
        for fmt in ("", "+frozen:int8"):
            stream = _batch_stream(*pooled, 16, seed)
            result = local_train(state, spec, TrainMode.parse("last:1" + fmt, spec.n_blocks), stream, steps,
                                 lr=lr, seed=seed, measure=False)
            model = build_model(spec)
            model.load_state_dict({**state, **result.update})
            found.append(_test(model, x, y))
        print(f"seed {seed}: frozen blocks fp32: loss {found[0][0]:.5f}, accuracy {found[0][1]:.5f}; int8: loss "
              f"{found[1][0]:.5f}, accuracy {found[1][1]:.5f}; int8 - fp32: {found[1][0] - found[0][0]:+.5f} nats, "
              f"{100 * (found[1][1] - found[0][1]):+.3f} points")


def _test(model, x, y) -> tuple[float, float]:
    """Mean loss (nats per character) and accuracy of ``model`` on windows ``x`` with targets ``y``."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model.head(model.features(x[s:s + 64])) for s in range(0, len(x), 64)])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    return float(loss), float((logits.argmax(-1) == y).float().mean())


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    parser.add_argument("--accuracy", action="store_true", help="test-set cost of compact weights instead")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of --accuracy")
    parser.add_argument("--lr", type=float, default=0.1, help="fine-tuning SGD learning rate of --accuracy")
    args = parser.parse_args()
    if args.accuracy:
        return accuracy(args.steps, args.lr)
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
                      f"{_mib(report.totals['param_bytes'])} | {_mib(report.peak_bytes)} | {_mib(measured)} | "
                      f"{report.peak_bytes / measured - 1:+.2%} |", flush=True)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


if __name__ == "__main__":
    main()
