"""The LDNOOBW blocklist at token level: which training tokens spell (part of) a blocklisted word.

Used to measure selection quality (target enrichment, coverage) and by the `blocklist-tokens` baseline, which
marks the positions whose next token is part of a blocklisted word. Never used by the evaluation scorers.
"""

from __future__ import annotations

import re

import numpy as np

from .corpora import blocklist


def blocklist_pattern(words: list[str]) -> re.Pattern:
    """A regex matching any blocklist entry as a whole word (C4's document filter), longest entry first.

    The entries are merged into a character trie, so the regex never retries shared prefixes (6x faster than
    a flat alternation)."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word.lower():
            node = node.setdefault(char, {})
        node[""] = {}

    def branch(node: dict) -> str:
        alternatives = [re.escape(char) + branch(child) for char, child in sorted(node.items()) if char]
        if not alternatives:
            return ""
        group = "(?:" + "|".join(alternatives) + ")"
        return group + "?" if "" in node else group  # greedy: a longer entry is tried before a shorter one

    return re.compile(rf"(?<![a-z0-9]){branch(trie)}(?![a-z0-9])")


def blocklist_words() -> list[str]:
    """The blocklist's distinct lower-case entries, sorted: a word's id is its index here."""
    return sorted({w.lower() for w in blocklist()})


def token_texts(tok) -> list[str]:
    """The text of every token id on its own (byte pieces of a multi-byte character decode to a stand-in)."""
    return [tok.decode([i]) for i in range(len(tok))]


class WordLocator:
    """Finds blocklisted words in token sequences: per token, the id of the word it is part of, or -1."""

    def __init__(self, texts: list[str], words: list[str]):
        self.pattern = blocklist_pattern(words)
        self.index = {w: i for i, w in enumerate(words)}
        # lower-case each token: offsets stay those of the joined text
        self.texts = [t.lower() for t in texts]
        self.lengths = np.array([len(t) for t in self.texts], dtype=np.int64)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids), -1, dtype=np.int16)
        text = "".join(map(self.texts.__getitem__, ids.tolist()))
        matches = [(m.start(), m.end() - 1, self.index[m.group()]) for m in self.pattern.finditer(text)]
        if matches:
            starts, lasts, words = np.array(matches).T
            ends = np.cumsum(self.lengths[ids])
            for first, last, word in zip(np.searchsorted(ends, starts, side="right").tolist(),
                                         np.searchsorted(ends, lasts, side="right").tolist(), words.tolist()):
                out[first: last + 1] = word
        return out


def locate_words(blocks: np.ndarray, texts: list[str], words: list[str]) -> np.ndarray:
    """Per token of each block, the id of the blocklisted word it is part of within the block's text, or
    -1."""
    locate = WordLocator(texts, words)
    if not len(blocks):
        return np.zeros(blocks.shape, dtype=np.int16)
    return np.stack([locate(ids) for ids in blocks])


def next_token_words(word_ids: np.ndarray) -> np.ndarray:
    """Per position j, the blocklisted word id of token j+1 (what position j predicts), -1 at the last
    position."""
    out = np.full(word_ids.shape, -1, dtype=word_ids.dtype)
    out[:, :-1] = word_ids[:, 1:]
    return out
