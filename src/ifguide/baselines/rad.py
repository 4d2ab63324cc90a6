"""Reward-augmented decoding (RAD; Deng & Raffel, 2023) as a logits processor for `model.generate`.

At every step the top-k candidate tokens of each sequence are scored by the toxicity reward model, each as the
continuation generated so far plus that candidate, and their logits are shifted by beta * (1 - toxicity);
every other token is dropped. The reward model keeps a KV cache of the continuation, so each step costs one
forward pass of k one-token rows per sequence. With beta = 0 this is top-k sampling, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from ..model import cache_argument


class RewardAugmentedLogits(LogitsProcessor):
    """Stateful: use one instance per `generate` call. The reward model reads the continuation only, not the
    prompt, as the evaluation scorers do."""

    def __init__(self, reward_model: PreTrainedModel, top_k: int, beta: float):
        self.reward_model, self.top_k, self.beta = reward_model, top_k, beta
        self.cache_argument = cache_argument(reward_model)  # looked up once, not at every step
        self.prompt_length: int | None = None
        self.cache: DynamicCache | None = None
        self.candidates: torch.Tensor | None = None  # (rows, k) token ids scored at the previous step
        self.toxicity: torch.Tensor | None = None  # (rows, k) their toxicity, kept for inspection and tests

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, k = scores.shape[0], min(self.top_k, scores.shape[1])
        if self.prompt_length is None:
            self.prompt_length, self.cache = input_ids.shape[1], DynamicCache()
        elif self.candidates is not None:
            # keep, per row, the cache of the candidate that was sampled (rows that ended hold padding: any
            # will do)
            picked = (self.candidates == input_ids[:, -1:]).int().argmax(dim=1)
            self.cache.batch_select_indices(torch.arange(rows,
                                                         device=picked.device) * self.candidates.shape[1]
                                            + picked)
        values, candidates = scores.topk(k, dim=1)
        if self.cache.get_seq_length() > 0:
            self.cache.batch_repeat_interleave(k)
        logits = self.reward_model(input_ids=candidates.reshape(-1, 1), use_cache=True,
                                   **{self.cache_argument: self.cache}).logits
        self.candidates = candidates
        self.toxicity = torch.sigmoid(logits[:, -1, 0].float()).view(rows, k)
        shifted = values + self.beta * (1.0 - self.toxicity).to(values.dtype)
        return torch.full_like(scores, -float("inf")).scatter(1, candidates, shifted)


def rad_processors(reward_model: PreTrainedModel, top_k: int,
                   beta: float) -> Callable[[], LogitsProcessorList]:
    """A maker of fresh RAD processors, one per `generate` call (the processor keeps per-call state)."""
    return lambda: LogitsProcessorList([RewardAugmentedLogits(reward_model, top_k, beta)])
