"""Sampling with each prompt encoded once (`prompt_cache`) against re-encoding it for every sample, as
`generate` with `num_return_sequences` does: the same model, prompts and seeds, timed side by side, samples
compared.

Needs a run with a trained model (`make demo` first). Two settings: the evaluation's (25 samples, batches of 8
prompts, 1 thread as in the demo's evaluation workers) and the self-queries' (8 samples, batches of 64
prompts, 2 threads as in the demo's `queries` stage). Rounds alternate the two ways; the figure is the median
of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from ifguide.artifacts import Run
from ifguide.data.prompts import read_jsonl
from ifguide.data.tokenizer import load_tokenizer
from ifguide.model import generate, load_model
from ifguide.queries.stage import query_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--prompts", type=int, default=100, help="RTP prompts per round (the demo has 100)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.load_config()
    model, tok = load_model(run.model(args.model)), load_tokenizer(run.data())
    prompts = [r["prompt"] for r in read_jsonl(run.data() / "prompts" / "rtp.jsonl")][: args.prompts]
    max_prompt = cfg.data.block_size - cfg.eval.max_new_tokens
    settings = {"evaluation": (cfg.eval, 1),
                "self-queries": (query_sampling(cfg, cfg.queries.samples_per_prompt, cfg.queries.seed), 2)}
    for setting, (sampling, threads) in settings.items():
        torch.set_num_threads(threads)
        ratios, same = [], True
        for _ in range(args.rounds):
            start = time.perf_counter()
            # every sample re-encodes its prompt
            with mock.patch("ifguide.model.prompt_cache", lambda *_: None):
                every = generate(model, tok, prompts, sampling, max_prompt)
            middle = time.perf_counter()
            once = generate(model, tok, prompts, sampling, max_prompt)
            ratios.append((middle - start) / (time.perf_counter() - middle))
            same &= every == once
        print(f"{setting} ({len(prompts)} prompts x {sampling.num_samples} samples, batches of "
              f"{sampling.prompt_batch_size} prompts, {threads} thread{'s' * (threads > 1)}): prompts "
              f"encoded once are {statistics.median(ratios):.2f}x faster (median of {args.rounds} rounds); "
              f"samples identical: {same}")


if __name__ == "__main__":
    main()
