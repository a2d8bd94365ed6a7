"""Fashion-MNIST transfer: vit-tiny pretrained on five classes, fine-tuned federated on the other five.

Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), images float32
``[N, 1, 28, 28]`` scaled to [0, 1] and standardised with the training-set mean and std.
Pretraining (``caff pretrain vit-tiny``) sees only the training images of `PRETRAIN_CLASSES`
(T-shirt/top, trouser, pullover, dress, coat: 30,000 images, the last 2,000 held out). The
federated task is the other five classes (sandal, shirt, sneaker, bag, ankle boot: 30,000
training images), split across `N_CLIENTS` clients by Dirichlet(0.5) label skew, each holding
out a quarter. Fine-tuning starts from the pretrained blocks with a fresh seeded head (the
CIFAR-100 to CIFAR-10 pattern); the head keeps ten outputs and labels keep their Fashion-MNIST
numbers, so the pretraining classes are simply never the answer. A client reads only its own
images from the compressed file (`read_images` streams it and keeps the rows asked for).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import torch
from torch import Tensor

from trainer.tasks.base import DATA_SEED, ClientData, DataUnavailable, Task
from trainer.tasks.partition import dirichlet_clients

FMNIST_HINT = "Fashion-MNIST data needs Debian's dataset-fashion-mnist: apt-get install dataset-fashion-mnist"
FMNIST_DIR = os.environ.get("CAFF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")  # the Debian package's
#: Mean and std of the 60,000 training images after scaling pixels to [0, 1].
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
PRETRAIN_HELDOUT = 2_000
N_CLIENTS, ALPHA, TEST_FRAC = 200, 0.5, 0.25
IMAGE_BYTES, IMAGE_HEADER, LABEL_HEADER = 28 * 28, 16, 8
_CHUNK = 2_000  # images decompressed at a time while streaming


def _paths(split: str, root: str | None) -> tuple[str, str]:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError("split must be 'train' or 'test'")
    root = root or FMNIST_DIR
    images, labels = (os.path.join(root, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
    if not (os.path.isfile(images) and os.path.isfile(labels)):
        raise DataUnavailable(FMNIST_HINT)
    return images, labels


def _check_header(header: bytes, magic: int, path: str) -> int:
    got, count = struct.unpack(">II", header[:8])
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic {got} (expected {magic})")
    return count


@functools.lru_cache(maxsize=2)
def read_labels(split: str = "train", root: str | None = None) -> Tensor:
    """int64 ``[N]``: every label of a split (60,000 or 10,000 bytes on disk, uncompressed)."""
    _, path = _paths(split, root)
    with gzip.open(path, "rb") as f:
        data = f.read()
    count = _check_header(data[:LABEL_HEADER], 2049, path)
    if len(data) - LABEL_HEADER != count:
        raise ValueError(f"{path}: {len(data) - LABEL_HEADER} labels, header says {count}")
    return torch.frombuffer(bytearray(data[LABEL_HEADER:]), dtype=torch.uint8).long()


def read_images(rows: Tensor, split: str = "train", root: str | None = None) -> Tensor:
    """float32 ``[len(rows), 1, 28, 28]``, standardised: only the images at ``rows``, in that order.

    Streams the compressed file in chunks of `_CHUNK` images and keeps the rows asked for, so
    memory holds one chunk (1.5 MiB) beside the result, never the whole file (47 MB)."""
    path, _ = _paths(split, root)
    order = torch.argsort(rows)
    wanted = rows[order]
    out = torch.empty(len(rows), IMAGE_BYTES, dtype=torch.uint8)
    with gzip.open(path, "rb") as f:
        count = _check_header(f.read(IMAGE_HEADER), 2051, path)
        if len(rows) and (int(wanted[0]) < 0 or int(wanted[-1]) >= count):
            raise ValueError(f"image rows must lie in 0..{count - 1}")
        done = 0
        for start in range(0, count, _CHUNK):
            if done == len(rows):
                break
            chunk = torch.frombuffer(bytearray(f.read(_CHUNK * IMAGE_BYTES)), dtype=torch.uint8).view(-1, IMAGE_BYTES)
            end = done + int(torch.searchsorted(wanted[done:], start + len(chunk)))
            out[order[done:end]] = chunk[wanted[done:end] - start]
            done = end
    return out.view(-1, 1, 28, 28).float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)


def fashion_mnist(split: str = "train", root: str | None = None) -> tuple[Tensor, Tensor]:
    """``(x float32 [N, 1, 28, 28], y int64 [N])``, a whole split (train 60,000, test 10,000)."""
    labels = read_labels(split, root)
    return read_images(torch.arange(len(labels)), split, root), labels


def class_rows(classes) -> Tensor:
    """Training-image rows of these classes, ascending."""
    labels = read_labels()
    return torch.nonzero(torch.isin(labels, torch.tensor(list(classes))), as_tuple=True)[0]


@functools.lru_cache(maxsize=1)
def _partition() -> dict[str, tuple[Tensor, Tensor]]:
    rows = class_rows(c for c in range(10) if c not in PRETRAIN_CLASSES)
    clients = dirichlet_clients("fmnist", read_labels()[rows], N_CLIENTS, ALPHA, TEST_FRAC, DATA_SEED)
    return {name: (rows[train], rows[test]) for name, (train, test) in clients.items()}


class FashionMNIST(Task):
    name, kind, seq, n_outputs = "fashion-mnist", "vit", None, len(FMNIST_CLASSES)
    models = ("vit-tiny",)
    # images: at 90 % accuracy the standard error over 4,000 is 0.47 points
    test_size, validation_size = 4000, 2000

    def client_names(self) -> list[str]:
        return sorted(_partition())

    def load_clients(self, names: list[str], heldout_only: bool = False) -> list[ClientData]:
        splits = [(train[:0] if heldout_only else train, test) for train, test in (_partition()[n] for n in names)]
        rows = torch.cat([torch.cat(s) for s in splits]) if splits else torch.zeros(0, dtype=torch.int64)
        images, labels, out, at = read_images(rows), read_labels()[rows], [], 0
        for name, (train, test) in zip(names, splits):
            n, m = len(train), len(test)
            out.append(ClientData(name, (images[at:at + n], labels[at:at + n]),
                                  (images[at + n:at + n + m], labels[at + n:at + n + m])))
            at += n + m
        return out

    def initial_state(self, spec, checkpoints=None) -> dict[str, Tensor]:
        """The blocks pretrained on the other five classes, and a fresh seeded head."""
        from costmodel import build_model

        fresh = build_model(spec).state_dict()
        return super().initial_state(spec, checkpoints) | {k: fresh[k] for k in fresh if k.startswith("head.out.")}

    def pretraining_data(self, spec) -> dict:
        rows = class_rows(PRETRAIN_CLASSES)
        x, y = read_images(rows), read_labels()[rows]
        cut = len(rows) - PRETRAIN_HELDOUT
        names = ", ".join(FMNIST_CLASSES[c] for c in PRETRAIN_CLASSES)
        return {"train": (x[:cut], y[:cut]), "heldout": (x[cut:], y[cut:]),
                "data": (f"Fashion-MNIST (Debian dataset-fashion-mnist) classification of the {len(rows):,} training "
                         f"images of classes {names} only (standardized with mean {FMNIST_MEAN} std {FMNIST_STD}), "
                         f"the first {cut:,} of them as random batches; the other five classes are the federated "
                         f"task and the official test set is not used"),
                "heldout_data": f"the last {PRETRAIN_HELDOUT:,} training images of those classes"}

    def describe(self) -> str:
        return (f"Fashion-MNIST classes {', '.join(FMNIST_CLASSES[c] for c in range(5, 10))} "
                f"(30,000 training images), {N_CLIENTS} clients by Dirichlet({ALPHA}) label skew")
