"""Selection over 100M synthetic per-token scores in shards: wall time and peak RSS (goal: <= 60 s, <= 1
GB)."""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from ifguide.influence import ScoreReader, write_shards
from ifguide.selection.algorithm1 import algorithm1


def write_synthetic(root: Path, n_blocks: int, block: int, shard_blocks: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shards = ((start, rng.standard_normal((min(shard_blocks, n_blocks - start), block), dtype=np.float32))
              for start in range(0, n_blocks, shard_blocks))
    write_shards(root, shards, (n_blocks, block), "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=float, default=100e6)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--shard-blocks", type=int, default=4096)
    args = parser.parse_args()
    n_blocks = int(args.tokens) // args.block
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, n_blocks, args.block, args.shard_blocks)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        result = algorithm1(ScoreReader(root), quantile=0.99, window=1, budget=0.02)
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"select: {n_blocks * args.block / 1e6:.0f}M token scores ({n_blocks:,} blocks of {args.block}), "
          f"marked {len(result['blocks']):,}; wall {elapsed:.1f}s; peak RSS {peak:.0f} MB "
          f"(before selection: {rss_before:.0f} MB, writing shards included)")


if __name__ == "__main__":
    main()
