"""How the mask and its cost change when EK-FAC factors see fewer blocks or fewer layers are tracked.

Each variant is FRACTION/LAYERS: the share of blocks the factors see and how many of the last transformer
blocks are tracked ("all" = every block). The first variant is the reference for the mask overlap.
Enrichment: how much more often the top 1% of scores predict a blocklisted word than tokens do overall.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import load_from_disk

from ifguide.artifacts import Run
from ifguide.data.blocks import block_array
from ifguide.data.corpora import blocklist
from ifguide.data.tokenizer import load_tokenizer
from ifguide.influence import (
    ScoreReader,
    compute_direction,
    fit_factors,
    score_blocks,
    token_scorer,
    write_shards,
)
from ifguide.model import load_model
from ifguide.selection.algorithm1 import algorithm1


def toxic_target_enrichment(scores: np.ndarray, blocks: np.ndarray, toxic_ids: np.ndarray) -> float:
    """Rate of blocklisted next tokens among the top 1% of per-token scores, over their rate in all tokens."""
    is_toxic = np.zeros(blocks.shape, dtype=bool)
    is_toxic[:, :-1] = toxic_ids[blocks[:, 1:]]  # position t is scored for predicting token t+1
    top = scores >= np.quantile(scores, 0.99)
    return float(is_toxic[top].mean() / is_toxic.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--variants", default="1/all,0.25/all,0.0625/all,0.0625/2,0.0625/1")
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.load_config()
    model, blocks = load_model(run.model(args.model)), block_array(run)
    queries = load_from_disk(str(run.data() / "queries"))
    tok = load_tokenizer(run.data())
    words = {w.lower() for w in blocklist()}
    toxic_ids = np.array([tok.decode([i]).strip().lower() in words for i in range(len(tok))])
    reference = None
    print(f"{args.run}, model {args.model}: {len(blocks):,} blocks x {blocks.shape[1]} tokens")
    for variant in args.variants.split(","):
        fraction, layers = variant.split("/")
        n = max(1, int(float(fraction) * len(blocks)))
        icfg = dataclasses.replace(cfg.influence, covariance_max_examples=n, lambda_max_examples=n,
                                   last_layers=None if layers == "all" else int(layers))
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            tracked = fit_factors(model, blocks, icfg, root / "factors", seed=cfg.seed)["tracked_modules"]
            fit_s = time.perf_counter() - start
            (root / "scores").mkdir()
            start = time.perf_counter()
            direction = compute_direction(copy.deepcopy(model), queries, "toxic-minus-nontoxic", tracked,
                                          root / "factors", icfg.strategy, icfg.damping,
                                          icfg.query_batch_size)
            scorer = token_scorer(icfg.token_scores, copy.deepcopy(model), direction)
            write_shards(root / "scores", score_blocks(scorer, blocks, icfg.shard_blocks,
                                                       icfg.train_batch_size),
                         blocks.shape, "float32")
            score_s = time.perf_counter() - start
            reader = ScoreReader(root / "scores")
            result = algorithm1(reader, cfg.select.quantile, cfg.select.window, cfg.select.budget)
            enrichment = toxic_target_enrichment(reader.blocks(0, len(blocks)), blocks, toxic_ids)
        mask = set(zip(result["blocks"].tolist(), result["positions"].tolist()))
        reference = mask if reference is None else reference
        print(f"factors on {float(fraction):7.2%} of blocks, layers {layers:>3}: fit {fit_s:6.1f}s, "
              f"scores {score_s:6.1f}s, Jaccard with {args.variants.split(',')[0]} "
              f"{len(mask & reference) / max(len(mask | reference), 1):.3f}, "
              f"recall {len(mask & reference) / max(len(reference), 1):.3f}, toxic-target enrichment "
              f"{enrichment:.1f}x", flush=True)


if __name__ == "__main__":
    main()
