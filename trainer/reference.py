"""The reference points a federated run is judged against, on the server's test set.

``pretrained``: the task's starting point (for Fashion-MNIST, whose head is fresh, with only the head
trained centrally). ``upper_bound``: centralized full fine-tuning on the pooled training data of every
federated client. Headroom = upper bound - pretrained.
"""

from __future__ import annotations

import time

import torch

from costmodel import ModelSpec, TrainMode
from trainer.engine import evaluate, initial_state
from trainer.local import local_train
from trainer.tasks import get_task, population
from trainer.tasks.base import evaluation_set


def references(task: str, spec: ModelSpec, steps: int = 600, batch: int = 32, lr: float = 1e-3,
               samples: int | None = None) -> dict:
    """``{"pretrained": {"loss", "accuracy"}, "upper_bound": {...}, ...}`` on the first ``samples``
    (None: all) test samples; central training is AdamW for ``steps`` steps of ``batch``, seed 0."""
    job = get_task(task)
    test = evaluation_set(job, "test")
    start = initial_state(task, spec, True)
    clients = job.load_clients(population(job)[0])
    x, y = torch.cat([c.train[0] for c in clients]), torch.cat([c.train[1] for c in clients])
    generator, cpu = torch.Generator().manual_seed(0), time.process_time()

    def batches():
        while True:
            rows = torch.randint(0, len(x), (batch,), generator=generator)
            yield x[rows], y[rows]

    def central(mode: str, state: dict) -> dict:
        result = local_train(state, spec, TrainMode.parse(mode, spec.n_blocks), batches(), steps, "adam", lr,
                             measure=False)
        return state | result.update

    out = {"task": task, "model": spec.name, "test_samples": len(test[1][:samples]), "pooled_train_samples": len(y),
           "central": f"AdamW lr {lr:g}, {steps} steps of batch {batch} on the pooled training data of all "
                      f"{len(clients)} federated clients, seed 0"}
    if job.name == "fashion-mnist":
        start = central("head", start)
        out["pretrained_note"] = "pretrained blocks with only the fresh head trained centrally (as above)"
    out["pretrained"] = dict(zip(("loss", "accuracy"), evaluate(spec, start, test, samples)))
    out["upper_bound"] = dict(zip(("loss", "accuracy"), evaluate(spec, central("all", start), test, samples)))
    out["central_cpu_seconds"] = time.process_time() - cpu
    return out
