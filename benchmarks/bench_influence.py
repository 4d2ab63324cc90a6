"""Training vs influence throughput on one model and batch: train, covariance, lambda and score tokens/s."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from ifguide.config import InfluenceConfig, load_config
from ifguide.influence import fit_factors, score_shards
from ifguide.model import build_model


def train_tokens_per_s(model, blocks: np.ndarray, batch: int, lr: float) -> float:
    """Forward + backward + AdamW over the blocks, as the Trainer does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(blocks), batch):
        ids = torch.as_tensor(blocks[i: i + batch], dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return blocks.size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--factor-batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--score-batch", type=int, default=None, help="default: train.batch_size")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    vocab, block, batch = cfg.data.vocab_size, cfg.data.block_size, cfg.train.batch_size
    blocks = np.random.default_rng(0).integers(1, vocab, (args.blocks, block)).astype(np.int32)
    model = build_model(cfg.model, vocab, block, eos_id=0, seed=0)
    train_tps = train_tokens_per_s(model, blocks, batch, cfg.train.lr)
    icfg = InfluenceConfig(factor_batch_size=args.factor_batch or batch, train_batch_size=args.score_batch or batch,
                           query_batch_size=32,
                           shard_blocks=args.blocks)
    rng = np.random.default_rng(1)
    q_len = cfg.data.query_max_tokens
    ids = rng.integers(1, vocab, (64, q_len)).tolist()
    queries = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * q_len] * 64,
                                 "labels": [[-100] * (q_len // 2) + row[q_len // 2:] for row in ids],
                                 "toxic": [i < 32 for i in range(64)]})
    with tempfile.TemporaryDirectory() as tmp:
        timings = fit_factors(model, blocks, icfg, Path(tmp) / "f", seed=0)
        start = time.perf_counter()
        for _ in score_shards(model, blocks, queries, "toxic-minus-nontoxic", icfg, Path(tmp) / "f", Path(tmp) / "s"):
            pass
        score_s = time.perf_counter() - start
    tokens = blocks.size
    cov_tps, lam_tps, score_tps = (tokens / timings["covariance_s"], tokens / timings["lambda_s"], tokens / score_s)
    overhead = train_tps * (1 / cov_tps + 1 / lam_tps + 1 / score_tps) + timings["eigendecomposition_s"] * \
        train_tps / tokens
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.blocks} blocks x {block} tokens, train batch {batch}, factor batch {icfg.factor_batch_size}, "
          f"score batch {icfg.train_batch_size}, {torch.get_num_threads()} threads")
    print(f"train       {train_tps:10,.0f} tokens/s")
    print(f"covariance  {cov_tps:10,.0f} tokens/s")
    print(f"lambda      {lam_tps:10,.0f} tokens/s")
    print(f"eigen       {timings['eigendecomposition_s']:10.2f} s")
    print(f"scores      {score_tps:10,.0f} tokens/s")
    print(f"score/train throughput ratio: {score_tps / train_tps:.2f} (goal >= 1.5)")
    print(f"influence overhead with factors on every block: {overhead:.2f} training epochs (goal <= 1.0)")


if __name__ == "__main__":
    main()
