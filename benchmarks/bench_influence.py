"""Training vs influence throughput on one model and batch: train, covariance, lambda and score tokens/s."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from ifguide.config import InfluenceConfig, load_config
from ifguide.influence import fit_factors, score_shards
from ifguide.model import build_model


def train_seconds(model, blocks: np.ndarray, batch: int, lr: float) -> float:
    """Seconds for one epoch of forward + backward + AdamW over the blocks, as the Trainer does (on a copy)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(blocks), batch):
        ids = torch.as_tensor(blocks[i: i + batch], dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--blocks", type=int, default=1024)
    parser.add_argument("--factor-batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--score-batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--factor-fraction", type=float, default=1.0, help="share of the blocks the factors see")
    parser.add_argument("--last-layers", type=int, default=None, help="track only the last N transformer blocks")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved train/score timings; best of each")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    vocab, block, batch = cfg.data.vocab_size, cfg.data.block_size, cfg.train.batch_size
    blocks = np.random.default_rng(0).integers(1, vocab, (args.blocks, block)).astype(np.int32)
    model = build_model(cfg.model, vocab, block, eos_id=0, seed=0)
    n_factor = max(1, round(args.factor_fraction * len(blocks)))
    icfg = InfluenceConfig(factor_batch_size=args.factor_batch or batch, train_batch_size=args.score_batch or batch,
                           query_batch_size=32, shard_blocks=args.blocks, last_layers=args.last_layers,
                           covariance_max_examples=n_factor, lambda_max_examples=n_factor)
    rng = np.random.default_rng(1)
    q_len = cfg.data.query_max_tokens
    ids = rng.integers(1, vocab, (64, q_len)).tolist()
    queries = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * q_len] * 64,
                                 "labels": [[-100] * (q_len // 2) + row[q_len // 2:] for row in ids],
                                 "toxic": [i < 32 for i in range(64)]})
    epoch_s = score_s = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        timings = fit_factors(model, blocks, icfg, Path(tmp) / "f", seed=0)
        for _ in range(args.repeats):  # this machine's speed drifts: interleave, keep the best of each
            epoch_s = min(epoch_s, train_seconds(model, blocks, batch, cfg.train.lr))
            start = time.perf_counter()
            for _ in score_shards(model, blocks, queries, "toxic-minus-nontoxic", icfg, Path(tmp) / "f",
                                  Path(tmp) / "s"):
                pass
            score_s = min(score_s, time.perf_counter() - start)
    factor_s = timings["covariance_s"] + timings["eigendecomposition_s"] + timings["lambda_s"]
    factor_tokens, tokens = n_factor * block, blocks.size
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.blocks} blocks x {block} tokens, train batch {batch}, factor batch {icfg.factor_batch_size}, "
          f"score batch {icfg.train_batch_size}, {torch.get_num_threads()} threads, "
          f"tracked: {len(timings['tracked_modules'])} modules (last_layers={args.last_layers}), "
          f"factors on {n_factor} blocks ({args.factor_fraction:.2%})")
    print(f"train       {tokens / epoch_s:10,.0f} tokens/s")
    print(f"covariance  {factor_tokens / timings['covariance_s']:10,.0f} tokens/s")
    print(f"lambda      {factor_tokens / timings['lambda_s']:10,.0f} tokens/s")
    print(f"eigen       {timings['eigendecomposition_s']:10.2f} s")
    print(f"scores      {tokens / score_s:10,.0f} tokens/s")
    print(f"score/train throughput ratio: {epoch_s / score_s:.2f} (goal >= 1.5)")
    print(f"influence overhead (factors {factor_s:.1f}s + scores {score_s:.1f}s) / epoch {epoch_s:.1f}s: "
          f"{(factor_s + score_s) / epoch_s:.2f} training epochs (goal <= 1.0)")


if __name__ == "__main__":
    main()
