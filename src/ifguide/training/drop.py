"""The `drop` objective's data: every document a mask touches leaves the corpus and the rest is cut into
blocks again, so the model spends the full corpus's steps on what is left (as the blocklist filter does)."""

from __future__ import annotations

import numpy as np


def dropped_documents(doc_ids: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """The documents of the target tokens at marked positions (position j marks token j+1; the last position
    of a block is read as its own token, as the selection's provenance does)."""
    targets = np.concatenate([doc_ids[:, 1:], doc_ids[:, -1:]], axis=1)
    return np.unique(targets[marked])


def blocks_without(ids: np.ndarray, doc_ids: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """The blocks' token stream without the dropped documents, cut again into blocks of the same length (the
    tail shorter than a block is left out, as prepare leaves it)."""
    stream = np.asarray(ids)[~np.isin(doc_ids, dropped)]
    block = ids.shape[1]
    return stream[: len(stream) // block * block].reshape(-1, block)
