"""Modern English for pretraining the char GPTs: Debian's English fortune files, never Shakespeare.

Files (installed under ``/usr/share/games/fortunes`` by the Debian packages ``fortunes``,
``fortunes-min``, ``fortunes-bofh-excuses`` and ``fortunes-debian-hints``): every English category
except the ASCII-art ones. ``fortunes-mario``'s files (``mario.*``) are Brazilian Portuguese and
stay out. A fortune that names Shakespeare or shares any run of `SHINGLE_WORDS` words with a play
(a quotation) is dropped, so the fine-tuning text is never seen. Each file is split by time: the
first 95 % of its fortunes train (joined by a blank line), the last 5 % are held out.
"""

from __future__ import annotations

import functools
import os
import re

import torch
from torch import Tensor

from trainer.tasks.chars import encode_tensor

SHINGLE_WORDS = 8
HELDOUT_FRAC = 0.05
_WORD_RE = re.compile(r"[a-z']+")


def _shingles(text: str) -> set[int]:
    words = _WORD_RE.findall(text.lower())
    return {hash(tuple(words[i:i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


@functools.lru_cache(maxsize=1)
def _shakespeare_shingles() -> frozenset[int]:
    from trainer.tasks.shakespeare import shakespeare_corpus, shakespeare_plays

    return frozenset(_shingles(shakespeare_corpus(shakespeare_plays())))


@functools.lru_cache(maxsize=1)
def english_texts() -> dict[str, list[str]]:
    """category -> its fortunes, in file order, without Shakespeare (see the module docstring)."""
    from trainer.tasks.fortunes import english_categories, fortunes_texts

    quoted = _shakespeare_shingles()
    return {category: [t for t in texts if "shakespeare" not in t.lower() and not _shingles(t) & quoted]
            for category, texts in english_categories(fortunes_texts()).items()}


def lm_windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Windows of ``seq_len + 1`` chars every ``seq_len`` chars: every character is a target once."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        return ids.new_zeros((0, seq_len)), ids.new_zeros((0, seq_len))
    return ids[: n * seq_len].view(n, seq_len), ids[1 : n * seq_len + 1].view(n, seq_len)


def char_pretraining_data(seq_len: int) -> dict:
    """Training ids (1-D), held-out windows ``(x, y)`` of ``seq_len`` and their descriptions."""
    from trainer.tasks.fortunes import FORTUNES_DIR, fortunes_texts

    texts = english_texts()
    dropped = sum(len(fortunes_texts()[c]) - len(kept) for c, kept in texts.items())
    train, heldout = [], []
    for category in sorted(texts):
        fortunes = texts[category]
        cut = len(fortunes) - max(1, round(HELDOUT_FRAC * len(fortunes)))
        train.append("\n\n".join(fortunes[:cut]))
        heldout.append(encode_tensor("\n\n".join(fortunes[cut:])))
    ids = encode_tensor("\n\n".join(train))
    windows = [lm_windows(h, seq_len) for h in heldout]
    x, y = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])
    n_chars = sum(len(h) for h in heldout)
    sizes = {c: os.path.getsize(os.path.join(FORTUNES_DIR, c)) for c in sorted(texts)}
    return {
        "train": ids,
        "heldout": (x, y),
        "files": sizes,
        "data": (f"next-character LM on modern English: {len(texts)} English Debian fortune files "
                 f"({sum(sizes.values()):,} bytes: packages fortunes, fortunes-min, fortunes-bofh-excuses, "
                 f"fortunes-debian-hints; not the ASCII-art files, not fortunes-mario's Portuguese), "
                 f"{dropped} fortunes that name or quote Shakespeare dropped; the first {1 - HELDOUT_FRAC:.0%} "
                 f"of each file ({len(ids):,} chars) trained on as random windows of {seq_len + 1} chars; "
                 f"no Shakespeare is ever read"),
        "heldout_data": (f"the last {HELDOUT_FRAC:.0%} of each English fortune file ({n_chars:,} chars): "
                         f"{len(x)} non-overlapping windows of {seq_len} targets"),
    }
