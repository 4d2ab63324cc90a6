"""RAD's generation speed against plain sampling: the same model, prompts and seeds, timed side by side.

Needs a run with a trained model and reward model (`make demo` first). Rounds alternate plain / RAD so that
the machine's drift hits both alike; the figure is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ifguide.artifacts import Run
from ifguide.baselines.rad import rad_processors
from ifguide.data.prompts import read_jsonl
from ifguide.data.tokenizer import load_tokenizer
from ifguide.model import generate, load_model
from ifguide.toxicity.reward import load_reward_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--prompts", type=int, default=40, help="RTP prompts per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.load_config()
    torch.set_num_threads(1)
    model, tok = load_model(run.model(args.model)), load_tokenizer(run.data())
    reward_model, info = load_reward_model(run)
    rows = read_jsonl(run.data() / "prompts" / "rtp.jsonl")
    prompts = [r["prompt"] for r in rows[: args.prompts]]
    max_prompt = cfg.data.block_size - cfg.eval.max_new_tokens

    rad = rad_processors(reward_model, cfg.rad.top_k, cfg.rad.beta)
    ratios = []
    for _ in range(args.rounds):
        seconds = {}
        for name, processors in (("plain", None), ("rad", rad)):
            start = time.perf_counter()
            generate(model, tok, prompts, cfg.eval, max_prompt, processors)
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["rad"] / seconds["plain"])
        tokens = len(prompts) * cfg.eval.num_samples * cfg.eval.max_new_tokens
        print(f"plain {tokens / seconds['plain']:,.0f} tokens/s, RAD {tokens / seconds['rad']:,.0f} tokens/s "
              f"(k={cfg.rad.top_k}, batch {cfg.eval.prompt_batch_size} prompts x "
              f"{cfg.eval.num_samples} samples)")
    print(f"RAD / plain generation time: {statistics.median(ratios):.2f}x (median of {args.rounds} rounds, "
          f"1 thread; reward model held-out AUC {info['heldout_auc']:.3f})")


if __name__ == "__main__":
    main()
