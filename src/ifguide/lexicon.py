"""The LDNOOBW blocklist at token level: which training tokens spell (part of) a blocklisted word.

Used to measure selection quality (target enrichment, coverage) and by the `blocklist-tokens` baseline, which
marks the positions whose next token is part of a blocklisted word. Never used by the evaluation scorers.
"""

from __future__ import annotations

import re

import numpy as np

from .corpora import blocklist


def blocklist_pattern(words: list[str]) -> re.Pattern:
    """A regex matching any blocklist entry as a whole word (C4's document filter)."""
    alternatives = "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")


def blocklist_words() -> list[str]:
    """The blocklist's distinct lower-case entries, sorted: a word's id is its index here."""
    return sorted({w.lower() for w in blocklist()})


def token_texts(tok) -> list[str]:
    """The text of every token id on its own (byte pieces of a multi-byte character decode to a stand-in)."""
    return [tok.decode([i]) for i in range(len(tok))]


def locate_words(blocks: np.ndarray, texts: list[str], words: list[str]) -> np.ndarray:
    """Per token, the id of the blocklisted word it is part of within its block's text, or -1."""
    pattern = blocklist_pattern(words)
    index = {w: i for i, w in enumerate(words)}
    texts = [t.lower() for t in texts]  # lower-case each token first: offsets stay those of the joined text
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    out = np.full(blocks.shape, -1, dtype=np.int16)
    for row, ids in enumerate(blocks):
        ends = np.cumsum(lengths[ids])
        text = "".join(texts[i] for i in ids)
        for match in pattern.finditer(text):
            first = int(np.searchsorted(ends, match.start(), side="right"))
            last = int(np.searchsorted(ends, match.end() - 1, side="right"))
            out[row, first: last + 1] = index[match.group()]
    return out


def next_token_words(word_ids: np.ndarray) -> np.ndarray:
    """Per position j, the blocklisted word id of token j+1 (what position j predicts), -1 at the last position."""
    out = np.full(word_ids.shape, -1, dtype=word_ids.dtype)
    out[:, :-1] = word_ids[:, 1:]
    return out
