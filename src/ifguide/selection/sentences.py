"""The `sentence-labels` mask: every sentence a scorer labels toxic, the labels of the conditional-training
rival (Korbak et al. 2023 label each sentence by a classifier's threshold)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data import sentence_starts


def sentence_selection(blocks: np.ndarray, ends: np.ndarray, decode: Callable[[list[int]], str],
                       score: Callable[[list[str]], np.ndarray], threshold: float) -> dict:
    """Positions predicting a token of a sentence scored >= `threshold` (same keys as algorithm1's result, no
    tau); the sentences run over the blocks read as one stream, as conditional training reads them."""
    n_blocks, block_size = blocks.shape
    stream = np.asarray(blocks, dtype=np.int64).reshape(-1)
    starts = sentence_starts(stream, ends)
    stops = np.append(starts[1:], len(stream))
    values = np.asarray(score([decode(stream[a:b].tolist()) for a, b in zip(starts, stops)]),
                        dtype=np.float64)
    toxic = values >= threshold
    spans = [np.arange(a, b) for a, b in zip(starts[toxic], stops[toxic])]
    tokens = np.concatenate(spans or [np.zeros(0, int)])
    # a block's first token is predicted in the block before: no position
    tokens = tokens[tokens % block_size != 0]
    return {"tau": None, "blocks": tokens // block_size, "positions": tokens % block_size - 1,
            "budget_tokens": int(len(tokens)), "sentences": int(len(starts)),
            "toxic_sentences": int(toxic.sum())}
