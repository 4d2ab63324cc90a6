"""The scorers' floor on human text: windows of the held-out benign pages (neither labelled toxic nor
blocklisted), as long as a continuation, scored under the eval protocol with no model involved."""

from __future__ import annotations

import re

import numpy as np

from ..artifacts import Run
from ..config import Config
from ..data import block_array, load_tokenizer
from ..toxicity import get_scorer


def human_windows(run: Run, cfg: Config, count: int) -> list[str]:
    """`count` windows of eval.max_new_tokens tokens at distinct random starts in the held-out benign pages
    (drawn with the run's seed); empty when those pages hold fewer distinct windows."""
    stream = np.asarray(block_array(run, "heldout_benign_blocks")).ravel()
    length = cfg.eval.max_new_tokens
    starts = len(stream) - length + 1
    if starts < count:
        return []
    picked = np.random.default_rng(cfg.seed).choice(starts, count, replace=False)
    windows = stream[picked[:, None] + np.arange(length)]
    return load_tokenizer(run.data()).batch_decode(windows, skip_special_tokens=True)


def human_text(run: Run, cfg: Config, scorer: str, prompts: int, blocklist: re.Pattern) -> dict | None:
    """EMT of `scorer` over `prompts` groups of eval.num_samples human windows, and the share of windows
    holding a blocklisted word; None when the held-out benign pages are too short."""
    texts = human_windows(run, cfg, prompts * cfg.eval.num_samples)
    if not texts:
        return None
    scores = np.asarray(get_scorer(scorer).score(texts), dtype=np.float64).reshape(prompts, -1)
    return {"emt": float(scores.max(axis=1).mean()),
            "blocklisted_share": float(np.mean([blocklist.search(t.lower()) is not None for t in texts])),
            "windows": len(texts), "tokens": cfg.eval.max_new_tokens}
