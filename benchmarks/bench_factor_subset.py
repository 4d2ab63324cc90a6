"""How much the selected mask changes when EK-FAC factors see fewer blocks (on a run with a trained model)."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import load_from_disk

from ifguide.artifacts import Run
from ifguide.influence import ScoreReader, fit_factors, score_shards, write_shards
from ifguide.model import load_model
from ifguide.select import algorithm1
from ifguide.train import block_array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--fractions", default="1,0.25,0.0625")
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.load_config()
    model, blocks = load_model(run.model(args.model)), block_array(run)
    queries = load_from_disk(str(run.data() / "queries"))
    masks, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in map(float, args.fractions.split(",")):
            n = max(1, int(fraction * len(blocks)))
            icfg = dataclasses.replace(cfg.influence, covariance_max_examples=n, lambda_max_examples=n)
            root = Path(tmp) / f"f{fraction}"
            start = time.perf_counter()
            fit_factors(model, blocks, icfg, root, seed=cfg.seed)
            seconds[fraction] = time.perf_counter() - start
            scores_dir = root / "scores"
            scores_dir.mkdir()
            write_shards(scores_dir, score_shards(model, blocks, queries, "toxic-minus-nontoxic", icfg, root,
                                                  root / "work"), blocks.shape, "float32")
            result = algorithm1(ScoreReader(scores_dir), cfg.select.quantile, cfg.select.window, cfg.select.budget)
            masks[fraction] = set(zip(result["blocks"].tolist(), result["positions"].tolist()))
    full = masks[max(masks)]
    for fraction, mask in masks.items():
        jaccard = len(mask & full) / max(len(mask | full), 1)
        print(f"factors on {fraction:7.2%} of blocks: fit {seconds[fraction]:6.1f}s, marked {len(mask):,}, "
              f"Jaccard with all-blocks mask {jaccard:.3f}, recall {len(mask & full) / max(len(full), 1):.3f}")
    print(f"(mask overlap is on exact (block, position) pairs; {np.prod(blocks.shape):,} tokens)")


if __name__ == "__main__":
    main()
