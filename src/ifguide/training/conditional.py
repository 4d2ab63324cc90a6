"""Conditional training (Korbak et al. 2023): the model learns text after a control token that says whether
the text is wanted, and generates after `<|aligned|>` with both control tokens blocked.

The training blocks are read as one stream and cut into sentences (data.sentence_starts). A sentence holding a
marked token (the token a marked position predicts) is misaligned, the others aligned. A control token opens
every run of sentences of one kind (`<|misaligned|>` before a misaligned run, `<|aligned|>` before an aligned
one and at the start of the stream), and a block that starts inside a misaligned run starts with
`<|misaligned|>` again, so every misaligned token has its control token in view. The stream is then cut into
blocks of the same length again (a last partial block is dropped). Control tokens are inputs only: the
positions that would predict one carry no loss, so the loss, like every perplexity, counts the corpus's own
tokens. Plain text reads as aligned text does, so the held-out perplexities are measured, without control
tokens, exactly as for every other model.
"""

from __future__ import annotations

import numpy as np

from ..data import sentence_starts


def conditional_blocks(blocks: np.ndarray, suppress: np.ndarray, ends: np.ndarray, aligned: int,
                       misaligned: int) -> np.ndarray:
    """The blocks with control tokens inserted as the module doc says; `suppress[b, j]` marks token j+1 of
    block b, `ends` (data.sentence_ends) says per token id whether it ends a sentence."""
    n_blocks, block_size = blocks.shape
    stream = np.asarray(blocks, dtype=np.int64).reshape(-1)
    marked = np.zeros((n_blocks, block_size), dtype=bool)
    marked[:, 1:] = np.asarray(suppress[:, :-1], dtype=bool)
    marked = marked.reshape(-1)
    starts = sentence_starts(stream, ends)
    bad_sentence = np.logical_or.reduceat(marked, starts)
    bad = np.repeat(bad_sentence, np.diff(np.append(starts, len(stream))))
    run_starts = np.flatnonzero(np.concatenate([[True], bad[1:] != bad[:-1]]))
    # every output block holds at least block_size - 1 stream or run tokens beside at most one restated one
    placed = len(stream) + len(run_starts)
    out = np.empty(placed + placed // max(block_size - 1, 1) + 1, dtype=np.int64)
    filled = 0
    for start, stop in zip(run_starts, np.append(run_starts[1:], len(stream))):
        kind = bad[start]
        piece = np.concatenate([[misaligned if kind else aligned], stream[start:stop]])
        while len(piece):
            # a block opens inside a misaligned run
            if filled % block_size == 0 and kind and piece[0] != misaligned:
                out[filled] = misaligned
                filled += 1
            take = min(len(piece), block_size - filled % block_size)
            out[filled: filled + take] = piece[:take]
            filled += take
            piece = piece[take:]
    usable = filled - filled % block_size
    return out[:usable].reshape(-1, block_size).astype(blocks.dtype)
