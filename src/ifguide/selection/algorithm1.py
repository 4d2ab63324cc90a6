"""The paper's Algorithm 1 over out-of-core per-token scores.

tau = the exact q-quantile of all scores (linear interpolation, as numpy.quantile). Per block,
s_i = #{j: S_ij > tau} and f_i = sum of those S_ij; both are min-max normalised over blocks and
blocks are ranked by 2 s f / (s + f) (ties: lower block index first). Blocks are walked in rank
order and, for each j > tau in ascending order, the window j-w..j+w (clipped to the block) is
marked; only newly marked tokens count, and the walk stops before the count would pass L.
A marked position j means: penalise the prediction of token j+1 (see training/objective.py).
"""

from __future__ import annotations

import numpy as np

from ..influence import ScoreReader, check_finite


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys whose integer order is the float order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def exact_quantile(reader: ScoreReader, q: float) -> float:
    """numpy.quantile(all scores, q) in two streaming passes: a 65,536-bin key histogram, then the bins."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    for start, shard in reader:
        values = np.asarray(shard).ravel()
        check_finite(values, f"scores {reader.path} (shard from block {start})")
        hist += np.bincount((_sortable_keys(values) >> 16).astype(np.int64), minlength=1 << 16)
    n = int(hist.sum())
    position = q * (n - 1)
    ranks = [int(np.floor(position)), min(int(np.floor(position)) + 1, n - 1)]
    cumulative = np.cumsum(hist)
    bins = [int(np.searchsorted(cumulative, r, side="right")) for r in ranks]
    candidates = []
    for _, shard in reader:
        values = np.asarray(shard).ravel()
        candidates.append(values[np.isin(_sortable_keys(values) >> 16, bins)])
    values = np.sort(np.concatenate(candidates).astype(np.float64))
    below = int(cumulative[bins[0] - 1]) if bins[0] > 0 else 0
    lo, hi = values[ranks[0] - below], values[ranks[1] - below]
    frac = position - ranks[0]
    return float(lo + (hi - lo) * frac)


def block_statistics(reader: ScoreReader,
                     tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """s_i, f_i per block and the (block, position) of every score above tau, shard by shard."""
    counts, sums, hit_blocks, hit_positions = [], [], [], []
    for start, shard in reader:
        shard = np.asarray(shard, dtype=np.float32)
        above = shard > tau
        counts.append(above.sum(axis=1))
        sums.append(np.where(above, shard, 0).sum(axis=1, dtype=np.float64))
        rows, cols = np.nonzero(above)
        hit_blocks.append(rows + start)
        hit_positions.append(cols)
    return (np.concatenate(counts), np.concatenate(sums), np.concatenate(hit_blocks).astype(np.int64),
            np.concatenate(hit_positions).astype(np.int64))


def _min_max(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x, dtype=np.float64)


def rank_blocks(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Block indices by descending harmonic mean of normalised s and f; ties by block index."""
    sn, fn = _min_max(s.astype(np.float64)), _min_max(f.astype(np.float64))
    total = sn + fn
    harmonic = np.divide(2 * sn * fn, total, out=np.zeros_like(total), where=total > 0)
    return np.lexsort((np.arange(len(s)), -harmonic))


def mark_windows(order: np.ndarray, hit_blocks: np.ndarray, hit_positions: np.ndarray, block_size: int,
                 window: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk blocks in `order`, mark windows around hits, stop before the budget; returns (blocks,
    positions)."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    walk = np.lexsort((hit_positions, rank[hit_blocks]))
    blocks, positions = hit_blocks[walk], hit_positions[walk]
    starts = np.maximum(positions - window, 0)
    ends = np.minimum(positions + window, block_size - 1)
    first_in_block = np.r_[True, blocks[1:] != blocks[:-1]] if len(blocks) else np.zeros(0, dtype=bool)
    previous_end = np.where(first_in_block, -1, np.r_[-1, ends[:-1]])
    new_starts = np.maximum(starts, previous_end + 1)
    new_counts = np.maximum(ends - new_starts + 1, 0)
    kept = int(np.searchsorted(np.cumsum(new_counts), budget, side="right"))
    new_starts, new_counts, blocks = new_starts[:kept], new_counts[:kept], blocks[:kept]
    marked_blocks = np.repeat(blocks, new_counts)
    offsets = np.arange(int(new_counts.sum())) - np.repeat(np.cumsum(new_counts) - new_counts, new_counts)
    return marked_blocks, np.repeat(new_starts, new_counts) + offsets


def budget_tokens(budget: float, total_tokens: int) -> int:
    """L: a fraction of all tokens (budget <= 1) or an absolute count (budget > 1)."""
    return int(budget * total_tokens) if budget <= 1 else int(budget)


def algorithm1(reader: ScoreReader, quantile: float, window: int, budget: float) -> dict:
    """Run Algorithm 1 over a score reader; returns the marked positions and their statistics."""
    n_blocks, block_size = reader.shape
    tau = exact_quantile(reader, quantile)
    s, f, hit_blocks, hit_positions = block_statistics(reader, tau)
    order = rank_blocks(s, f)
    limit = budget_tokens(budget, n_blocks * block_size)
    blocks, positions = mark_windows(order, hit_blocks, hit_positions, block_size, window, limit)
    sort = np.lexsort((positions, blocks))
    return {"tau": tau, "blocks": blocks[sort], "positions": positions[sort], "order": order,
            "budget_tokens": limit, "s": s, "f": f, "hit_blocks": hit_blocks, "hit_positions": hit_positions}
