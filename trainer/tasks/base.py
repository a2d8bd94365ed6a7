"""What every task module provides, and the population and evaluation sets built from it.

A task (`Task`) names the model kind and tokens per sample it needs, lists its whole client
population cheaply (`Task.client_names`), loads the data of only the clients asked for
(`Task.load_clients`), gives the pretrained starting weights (`Task.initial_state`) and the
data its model is pretrained on (`Task.pretraining_data`). The metric is the same for every
task: mean cross-entropy and accuracy of ``model.head(model.features(x))`` against ``y``
(per character for a char GPT, per sample for a classifier).

The population is fixed per task (its partition is seeded with `DATA_SEED`, not the run's seed,
so every run and seed evaluates on the same test set). A seeded tenth of the clients are
*unseen*: no device ever trains on them. Devices draw their clients from the rest, the
*federated* clients, by a seeded uniform draw (`device_client_names`), each device its own
while there are enough. The server's test set is a fixed uniform sample of the federated
clients' held-out samples; the validation set (for tuning learning rates) is a disjoint sample
of the same pool; the unseen set is a sample of the unseen clients' held-out samples.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch
from torch import Tensor

class DataUnavailable(RuntimeError):
    """A task's data (or its tokenizer) is not installed; the message names the package to install."""


DATA_SEED = 0  # seeds every task's partition, its unseen clients and its evaluation samples
UNSEEN_FRAC = 0.1  # share of a task's clients that never train


@dataclass
class ClientData:
    """One client's data: ``train = (x, y)`` and ``test = (x, y)`` (its held-out samples).

    Shakespeare: ``x`` and ``y`` int64 ``[n, seq_len]``, ``y`` is ``x`` shifted by one character
    (zero-copy views of one id tensor: do not modify them in place). fortunes: int64 token ids
    ``[n, max_len]``; Fashion-MNIST: float32 ``[n, 1, 28, 28]``. Class labels: int64 ``[n]``."""

    name: str
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test[0].shape[0])


class Task:
    """A federated task. Subclasses set the class attributes and implement the methods."""

    name: str
    kind: str  # the model kind it needs: gpt, encoder or vit
    seq: int | None  # tokens per sample (None: images)
    models: tuple[str, ...]  # zoo models pretrained for it
    test_size: int  # samples in the server's test set (and at most in the unseen set)
    n_outputs: int  # outputs a model needs: the vocabulary (char GPT) or the classes (classifier)
    validation_size: int

    def client_names(self) -> list[str]:
        """Every client of the population, sorted; each has at least one training sample."""
        raise NotImplementedError

    def load_clients(self, names: list[str], heldout_only: bool = False) -> list[ClientData]:
        """The data of these clients only, in the order asked (``heldout_only``: empty ``train``)."""
        raise NotImplementedError

    def initial_state(self, spec, checkpoints=None) -> dict[str, Tensor]:
        """The pretrained starting weights of ``spec`` for this task."""
        from trainer.checkpoint import checkpoint_path, load_pretrained

        try:
            return load_pretrained(spec, checkpoint_path(spec.name, checkpoints)).state_dict()
        except ValueError as missing:
            raise ValueError(f"{missing} (or pass --no-pretrained to start from random weights)") from None

    def pretraining_data(self, spec) -> dict:
        """``{"train", "heldout", "data", "heldout_data"}`` that ``caff pretrain`` trains ``spec`` on."""
        raise ValueError(f"{self.name}: nothing to pretrain here (its model is pretrained elsewhere)")

    def describe(self) -> str:
        """One line: the data, how they are split into clients, and what the model must predict."""
        raise NotImplementedError


def population(task: Task) -> tuple[list[str], list[str]]:
    """(federated client names, unseen client names), both sorted; fixed for the task."""
    names = task.client_names()
    unseen = set(random.Random(f"{task.name}:{DATA_SEED}:unseen").sample(names, round(UNSEEN_FRAC * len(names))))
    return [n for n in names if n not in unseen], sorted(unseen)


def device_client_names(task: Task, seed: int, n_devices: int) -> list[str]:
    """The client each of ``n_devices`` devices holds: a seeded uniform draw from the federated
    clients without replacement (a device ``i >= len(federated)`` shares the client of ``i % len``)."""
    federated, _ = population(task)
    drawn = random.Random(f"{task.name}:{seed}:devices").sample(federated, len(federated))
    return [drawn[i % len(drawn)] for i in range(n_devices)]


@functools.lru_cache(maxsize=6)  # the server's sets, built once per process
def _evaluation_picks(task: Task, split: str) -> tuple[list[ClientData], list[tuple[int, int]]]:
    federated, unseen = population(task)
    clients = task.load_clients(unseen if split == "unseen" else federated, heldout_only=True)
    pool = [(c, i) for c, client in enumerate(clients) for i in range(client.n_test)]
    source = "unseen" if split == "unseen" else "held-out"
    order = random.Random(f"{task.name}:{DATA_SEED}:{source}").sample(pool, len(pool))
    if split == "validation":
        picked = order[task.test_size:task.test_size + task.validation_size]
    elif split in ("test", "unseen"):
        picked = order[:task.test_size]
    else:
        raise ValueError(f"split: test, validation or unseen, not {split!r}")
    if not picked:
        raise ValueError(f"{task.name}: no held-out samples for the {split} set")
    return clients, picked


def evaluation_set(task: Task, split: str) -> tuple[Tensor, Tensor]:
    """``split`` test: ``task.test_size`` samples drawn uniformly (fixed seed) from every
    federated client's held-out samples; validation: ``task.validation_size`` more from the same
    pool, disjoint from the test ones; unseen: up to ``task.test_size`` from the unseen clients'."""
    clients, picked = _evaluation_picks(task, split)
    return (torch.stack([clients[c].test[0][i] for c, i in picked]),
            torch.stack([clients[c].test[1][i] for c, i in picked]))


def evaluation_sources(task: Task, split: str) -> list[str]:
    """The client each sample of ``evaluation_set(task, split)`` comes from, in order."""
    clients, picked = _evaluation_picks(task, split)
    return [clients[c].name for c, _ in picked]
