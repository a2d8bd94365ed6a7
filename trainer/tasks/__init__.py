"""The federated tasks, one module each, behind `trainer.tasks.base.Task`.

``shakespeare`` (`trainer.tasks.shakespeare`): next character, char GPTs pretrained on modern
English (`trainer.tasks.english`). ``fashion-mnist`` (`trainer.tasks.fashion_mnist`): five classes,
vit-tiny pretrained on the other five. ``fortunes`` (`trainer.tasks.fortunes`): topics, the real
all-MiniLM-L6-v2. Engines call `device_client` (one device's data, nothing else) and
`evaluation_set` (the server's test set); nothing outside this package names a task.
"""

from __future__ import annotations

import functools

from trainer.tasks.base import (ClientData, Task, device_client_names, evaluation_set, evaluation_sources,
                                population)
from trainer.tasks.fashion_mnist import FashionMNIST
from trainer.tasks.fortunes import Fortunes
from trainer.tasks.shakespeare import Shakespeare

TASKS: dict[str, Task] = {task.name: task for task in (Shakespeare(), FashionMNIST(), Fortunes())}

__all__ = ["TASKS", "ClientData", "Task", "device_client", "device_client_names", "evaluation_set",
           "evaluation_sources", "get_task", "population", "task_for_kind"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_for_kind(kind: str) -> Task:
    """The task whose models are of this kind (what ``caff pretrain`` pretrains a spec on)."""
    for task in TASKS.values():
        if task.kind == kind:
            return task
    raise ValueError(f"no task for models of kind {kind!r}")


@functools.lru_cache(maxsize=256)
def device_client(task: str, seed: int, n_devices: int, index: int) -> ClientData:
    """The data of device ``index`` of ``n_devices`` in a run seeded ``seed``: its own client only."""
    return get_task(task).load_clients([device_client_names(get_task(task), seed, n_devices)[index]])[0]
