"""Accuracy of a task's pretrained start on its test (and unseen) set, with the standard error across samples.

For Shakespeare a sample is an 80-character window: the error is over windows, not characters (the
characters of a window are not independent).

    python bench/test_set_error.py [--task shakespeare] [--model char-gpt-xs]
"""

import argparse
import math

import torch

from costmodel import ZOO, build_model
from trainer.engine import initial_state
from trainer.tasks import get_task
from trainer.tasks.base import evaluation_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="shakespeare")
    parser.add_argument("--model", default="char-gpt-xs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = ZOO[args.model]
    model = build_model(spec)
    model.load_state_dict(initial_state(args.task, spec, True))
    model.eval()
    for split in ("test", "unseen"):
        x, y = evaluation_set(get_task(args.task), split)
        with torch.no_grad():
            hits = torch.cat([(model.head(model.features(x[s:s + 64])).argmax(-1) == y[s:s + 64]).float()
                              .reshape(len(y[s:s + 64]), -1).mean(1) for s in range(0, len(x), 64)])
        print(f"{args.task} {split}: {len(hits)} samples, accuracy {hits.mean():.4f}, standard error "
              f"{100 * hits.std() / math.sqrt(len(hits)):.2f} points (sample sd {100 * hits.std():.1f} points)")


if __name__ == "__main__":
    main()
