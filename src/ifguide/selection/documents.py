"""Whole documents as the unit of marking: documents ranked by their mean per-token influence score
(`documents`), and the documents labelled toxic or hit by the blocklist (`labelled-documents`, what the
`clean` reference leaves out). A marked position j means token j+1 is the document's, as everywhere."""

from __future__ import annotations

import numpy as np

from ..influence import ScoreReader
from .algorithm1 import budget_tokens


def document_mean_scores(reader: ScoreReader, target_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean score, scored positions) per document id, over the positions whose target token is the
    document's; streamed shard by shard."""
    n_docs = int(target_docs.max()) + 1 if target_docs.size else 0
    sums, counts = np.zeros(n_docs), np.zeros(n_docs, dtype=np.int64)
    for start, shard in reader:
        docs = target_docs[start: start + len(shard)].ravel()
        sums += np.bincount(docs, weights=np.asarray(shard, dtype=np.float64).ravel(), minlength=n_docs)
        counts += np.bincount(docs, minlength=n_docs)
    means = np.divide(sums, counts, out=np.full(n_docs, -np.inf), where=counts > 0)
    return means, counts


def mark_documents(target_docs: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, positions) of every position whose target token belongs to a chosen document."""
    blocks, positions = np.nonzero(np.isin(target_docs, chosen))
    return blocks.astype(np.int64), positions.astype(np.int64)


def document_selection(reader: ScoreReader, target_docs: np.ndarray, budget: float) -> dict:
    """The `documents` mask: documents by descending mean score (ties: lower id first), whole, walked until
    the next one would pass the budget L (same keys as algorithm1's result, no tau)."""
    means, counts = document_mean_scores(reader, target_docs)
    limit = budget_tokens(budget, target_docs.size)
    order = np.lexsort((np.arange(len(means)), -means))
    order = order[counts[order] > 0]
    taken = int(np.searchsorted(np.cumsum(counts[order]), limit, side="right"))
    blocks, positions = mark_documents(target_docs, order[:taken])
    return {"tau": None, "blocks": blocks, "positions": positions, "budget_tokens": limit,
            "documents": taken}


def labelled_document_selection(target_docs: np.ndarray, toxic_label: np.ndarray,
                                blocklisted: np.ndarray) -> dict:
    """The `labelled-documents` mask: every document labelled toxic or holding a blocklisted word, whole (no
    budget)."""
    chosen = np.flatnonzero(toxic_label | blocklisted)
    blocks, positions = mark_documents(target_docs, chosen)
    return {"tau": None, "blocks": blocks, "positions": positions, "budget_tokens": len(blocks),
            "documents": len(chosen)}
