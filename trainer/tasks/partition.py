"""Seeded partitions of a labelled data set into clients: IID, Dirichlet label skew, train/test."""

from __future__ import annotations

import random

import torch
from torch import Tensor


def partition_iid(n_samples: int, n_clients: int, seed: int) -> list[Tensor]:
    """A seeded random split of ``range(n_samples)`` into ``n_clients`` parts
    whose sizes differ by at most one; each part is a sorted int64 tensor."""
    if n_clients < 1:
        raise ValueError("n_clients must be >= 1")
    if n_samples < n_clients:
        raise ValueError(f"cannot give {n_clients} clients a sample each from {n_samples}")
    perm = list(range(n_samples))
    random.Random(seed).shuffle(perm)
    base, extra = divmod(n_samples, n_clients)
    parts, start = [], 0
    for c in range(n_clients):
        size = base + (1 if c < extra else 0)
        parts.append(torch.tensor(sorted(perm[start : start + size]), dtype=torch.int64))
        start += size
    return parts


def partition_dirichlet(
    labels,
    n_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
    balance: bool = True,
) -> list[Tensor]:
    """Label-skew partition (Hsu et al. 2019; the NIID-Bench procedure).

    For every class, shuffle its samples and cut them among the clients in
    proportions drawn from ``Dirichlet(alpha, ..., alpha)``.  With
    ``balance`` (as NIID-Bench does) a client that already holds
    ``n_samples / n_clients`` samples gets no more of later classes.  The
    whole draw is repeated until every client has at least ``min_size``
    samples.  Small ``alpha`` -> few classes per client; large ``alpha`` ->
    close to IID.  Returns sorted int64 index tensors covering every sample
    exactly once; deterministic for a given seed (stdlib ``random``).
    """
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    labels = [int(v) for v in labels]
    n = len(labels)
    if n_clients < 1:
        raise ValueError("n_clients must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    if min_size * n_clients > n:
        raise ValueError(
            f"min_size={min_size} for {n_clients} clients needs {min_size * n_clients} "
            f"samples, only {n}"
        )
    by_class: dict[int, list[int]] = {}
    for i, v in enumerate(labels):
        by_class.setdefault(v, []).append(i)
    rng = random.Random(seed)
    cap = n / n_clients
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in sorted(by_class):
            idx = list(by_class[cls])
            rng.shuffle(idx)
            props = [rng.gammavariate(alpha, 1.0) for _ in range(n_clients)]
            if balance:
                props = [p if len(parts[c]) < cap else 0.0 for c, p in enumerate(props)]
            total = sum(props)
            if total <= 0.0:  # all draws underflowed (tiny alpha) or all clients full
                props = [0.0] * n_clients
                props[rng.randrange(n_clients)] = 1.0
                total = 1.0
            cuts, acc = [], 0.0
            for p in props[:-1]:
                acc += p / total
                cuts.append(int(acc * len(idx)))
            start = 0
            for c, end in enumerate(cuts + [len(idx)]):
                parts[c] += idx[start:end]
                start = end
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) partition of {n} samples over {n_clients} clients "
        f"gave every client {min_size} samples in {max_tries} draws; "
        "lower min_size or n_clients, or raise alpha"
    )


def split_train_test(
    idx: Tensor, test_frac: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Seeded split of an index tensor into (train, test); test gets
    ``round(test_frac * n)`` items, at least one when ``n >= 2`` and
    ``test_frac > 0``."""
    items = idx.tolist()
    random.Random(seed).shuffle(items)
    n_test = int(round(test_frac * len(items)))
    if test_frac > 0 and len(items) >= 2:
        n_test = min(max(n_test, 1), len(items) - 1)
    test, train = items[:n_test], items[n_test:]
    return torch.tensor(sorted(train), dtype=torch.int64), torch.tensor(
        sorted(test), dtype=torch.int64
    )


def dirichlet_clients(prefix: str, labels: Tensor, n_clients: int, alpha: float, test_frac: float,
                      seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Client name (``prefix/0000``...) -> (train, held-out) indices into ``labels``: Dirichlet(alpha)
    label skew, then each client's own seeded split."""
    parts = partition_dirichlet(labels, n_clients, alpha, seed)
    return {f"{prefix}/{c:04d}": split_train_test(idx, test_frac, seed * 1_000_003 + c)
            for c, idx in enumerate(parts)}


def label_entropy(labels, n_classes: int | None = None) -> float:
    """Shannon entropy (nats) of the label histogram of ``labels``."""
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if t.numel() == 0:
        return 0.0
    counts = torch.bincount(t.long(), minlength=n_classes or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

