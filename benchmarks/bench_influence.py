"""Training vs influence throughput on one model and batch: factors, query direction, and both token-score
kinds.

Influence overhead = (factor fit + query direction + scoring) / one training epoch of the same model on the
same blocks. Timings of training and scoring are interleaved and the best of --repeats is kept (the machine
drifts).
"""

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
from ifguide.influence import TOKEN_SCORES, compute_direction, fit_factors, score_blocks, token_scorer
from ifguide.model import build_model


def train_seconds(model, blocks: np.ndarray, batch: int, lr: float) -> float:
    """Seconds for one epoch of forward + backward + AdamW over the blocks, as the Trainer does (on a
    copy)."""
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


def score_seconds(kind: str, model, direction, blocks: np.ndarray, batch: int) -> float:
    scorer = token_scorer(kind, copy.deepcopy(model), direction)
    start = time.perf_counter()
    for _ in score_blocks(scorer, blocks, shard_blocks=len(blocks), batch_size=batch):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--blocks", type=int, default=1024)
    parser.add_argument("--score-batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--factor-fraction", type=float, default=1.0,
                        help="share of the blocks the factors see")
    parser.add_argument("--last-layers", type=int, default=None,
                        help="track only the last N transformer blocks")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved train/score timings; best of each")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    vocab, block, batch = cfg.data.vocab_size, cfg.data.block_size, cfg.train.batch_size
    blocks = np.random.default_rng(0).integers(1, vocab, (args.blocks, block)).astype(np.int32)
    model = build_model(cfg.model, vocab, block, eos_id=0, seed=0).eval()
    n_factor = max(1, round(args.factor_fraction * len(blocks)))
    icfg = InfluenceConfig(factor_batch_size=batch, last_layers=args.last_layers,
                           covariance_max_examples=n_factor, lambda_max_examples=n_factor)
    rng = np.random.default_rng(1)
    q_len = cfg.data.query_max_tokens
    ids = rng.integers(1, vocab, (64, q_len)).tolist()
    queries = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * q_len] * 64,
                                 "labels": [[-100] * (q_len // 2) + row[q_len // 2:] for row in ids],
                                 "toxic": [i < 32 for i in range(64)]})
    score_batch = args.score_batch or batch
    epoch_s, score_s = float("inf"), dict.fromkeys(TOKEN_SCORES, float("inf"))
    with tempfile.TemporaryDirectory() as tmp:
        timings = fit_factors(model, blocks, icfg, Path(tmp) / "f", seed=0)
        start = time.perf_counter()
        direction = compute_direction(copy.deepcopy(model), queries, "toxic-minus-nontoxic",
                                      timings["tracked_modules"], Path(tmp) / "f", "ekfac", None, 32)
        direction_s = time.perf_counter() - start
    for _ in range(args.repeats):  # this machine's speed drifts: interleave, keep the best of each
        epoch_s = min(epoch_s, train_seconds(model, blocks, batch, cfg.train.lr))
        for kind in TOKEN_SCORES:
            score_s[kind] = min(score_s[kind], score_seconds(kind, model, direction, blocks, score_batch))
    factor_s = timings["covariance_s"] + timings["eigendecomposition_s"] + timings["lambda_s"]
    factor_tokens, tokens = n_factor * block, blocks.size
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.blocks} blocks x {block} tokens, train batch {batch}, score batch {score_batch}, "
          f"{torch.get_num_threads()} threads, tracked: {len(timings['tracked_modules'])} modules "
          f"(last_layers={args.last_layers}), factors on {n_factor} blocks ({args.factor_fraction:.2%})")
    print(f"train       {tokens / epoch_s:10,.0f} tokens/s  (epoch {epoch_s:.1f}s)")
    print(f"covariance  {factor_tokens / timings['covariance_s']:10,.0f} tokens/s")
    print(f"lambda      {factor_tokens / timings['lambda_s']:10,.0f} tokens/s")
    print(f"eigen       {timings['eigendecomposition_s']:10.2f} s")
    print(f"direction   {direction_s:10.2f} s  (64 queries, once per query kind)")
    for kind in TOKEN_SCORES:
        overhead = (factor_s + direction_s + score_s[kind]) / epoch_s
        print(f"scores {kind:12s} {tokens / score_s[kind]:10,.0f} tokens/s; score/train "
              f"{epoch_s / score_s[kind]:.2f} (goal >= 1.5); overhead {overhead:.2f} epochs (goal <= 1.0)")


if __name__ == "__main__":
    main()
