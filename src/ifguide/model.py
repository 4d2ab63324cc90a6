"""Causal LMs from config (GPT-NeoX by default, Llama too) or from a local Hugging Face directory, and
sampling from them: the one model layer every stage after `data` shares."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Cache, GPTNeoXConfig, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from .artifacts import Journal, damaged
from .config import EvalConfig, ModelConfig
from .console import progress_bars_off
from .data import CONTROL_TOKENS
from .errors import IfguideError

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, vocab_size: int, block_size: int, eos_id: int,
                seed: int) -> PreTrainedModel:
    """A freshly initialised model (seeded); `train` loads `cfg.init_from` checkpoints itself."""
    if cfg.d_model % cfg.n_head:
        raise IfguideError(f"config: model.d_model ({cfg.d_model}) must be divisible by "
                           f"model.n_head ({cfg.n_head})")
    common = dict(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                  max_position_embeddings=block_size, bos_token_id=eos_id, eos_token_id=eos_id,
                  pad_token_id=eos_id, tie_word_embeddings=False)
    if cfg.arch == "gpt_neox":
        config = GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True,
                               attention_dropout=0.0, hidden_dropout=0.0)
    else:
        config = LlamaConfig(**common, num_key_value_heads=cfg.n_head)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_model(path: Path) -> PreTrainedModel:
    """A model saved with save_pretrained; a missing directory is a clear error."""
    if not (path / "config.json").is_file():
        raise IfguideError(f"{path} is not a model directory (no config.json); train it first, or give a "
                           "save_pretrained checkpoint")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        reason = str(exc).splitlines()[0][:120]
        if path.parent.name == "models":  # a model of a run
            raise damaged(path, reason) from None
        raise IfguideError(f"{path} is not a loadable causal LM ({reason})") from None
    model.eval()
    return model


def fit_checkpoint(model: PreTrainedModel, vocab_size: int, block_size: int, where: str,
                   added_tokens: int = 0) -> None:
    """Fit a checkpoint to the run: one short of at most `added_tokens` embedding rows (the run's control
    tokens) gets them appended, initialised by transformers; one whose embeddings or positions cannot take the
    run's tokens and blocks otherwise is refused."""
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size - added_tokens <= rows < vocab_size:
        model.resize_token_embeddings(vocab_size)
    elif rows < vocab_size:
        raise IfguideError(f"{where} has {rows:,} token embeddings but the run's tokenizer has "
                           f"{vocab_size:,} tokens; set data.tokenizer to the checkpoint's own "
                           "tokenizer directory")
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and positions < block_size:
        raise IfguideError(f"{where} takes at most {positions} positions; lower "
                           f"data.block_size to {positions}")


def with_linear_projections(model: PreTrainedModel) -> PreTrainedModel:
    """GPT-2's Conv1D projections (y = x W + b) replaced in place by equal nn.Linear modules (weight W^T),
    which Kronfluence can track; other models come back unchanged."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.nf, dtype=child.weight.dtype,
                                   device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of different lengths as one right-padded batch and its attention mask."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return input_ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: a left-padded row starts at 0 where its text starts, as `generate` places
    it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cache_argument(model: nn.Module) -> str:
    """What this transformers version calls the KV-cache argument: `cache` (from 5.2x) or
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ReservedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into room reserved for the whole generation instead of
    concatenating its growing cache at every step (most of a small model's sampling time)."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.length + key_states.shape[-2] > self.buffers[0].shape[-2]:
            self._reserve(max(self.room, self.length + key_states.shape[-2]), key_states)
        end = self.length + key_states.shape[-2]
        self.buffers[0][..., self.length:end, :] = key_states
        self.buffers[1][..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self.buffers[0][..., :end, :], self.buffers[1][..., :end, :]
        return self.keys, self.values

    def _reserve(self, room: int, like: torch.Tensor) -> None:
        shape = (*like.shape[:-2], room, like.shape[-1])
        buffers = (like.new_empty(shape), like.new_empty(shape))
        for old, new in zip(getattr(self, "buffers", ()), buffers):
            new[..., :self.length, :] = old[..., :self.length, :]
        self.buffers, self.is_initialized, self.device = buffers, True, like.device

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers)
        self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)


def ascending(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending; numpy's vectorised sort on the CPU is several times faster than torch's."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=1))
    return values.sort(dim=1).values


def sampling_candidates(logits: torch.Tensor, top_p: float, top_k: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, unnormalised probabilities) per row of what sampling may draw, with transformers'
    semantics: softmax of logits / temperature over the `top_k` likeliest tokens (0: all), cut to the nucleus:
    ranked by probability from the least likely, a token stays once the mass up to and including it exceeds
    1 - `top_p`. Over the whole vocabulary only the nucleus's smallest probability is found (one value sort,
    no argsort)."""
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    if 0 < top_k < logits.shape[1]:
        values, ids = logits.topk(top_k, dim=1)  # descending
        probs = torch.softmax(values, dim=1)
        if top_p < 1:
            below = 1 - (probs.cumsum(dim=1) - probs)  # the mass of each token and those ranked under it
            probs = torch.where(below > 1 - top_p, probs, torch.zeros_like(probs))
        return ids, probs
    probs = torch.softmax(logits, dim=1)
    ids = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
    if top_p >= 1:
        return ids, probs
    ranked = ascending(probs)
    first_kept = (ranked.cumsum(dim=1) > 1 - top_p).int().argmax(dim=1, keepdim=True)
    return ids, torch.where(probs >= ranked.gather(1, first_kept), probs, torch.zeros_like(probs))


def draw(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn with probability proportional to `weights` (one uniform number per row)."""
    cumulative = weights.cumsum(dim=1)
    target = torch.rand(len(weights), 1, device=weights.device) * cumulative[:, -1:]
    pick = torch.searchsorted(cumulative, target, right=True).clamp(max=weights.shape[1] - 1)
    return ids.gather(1, pick).squeeze(1)


@torch.no_grad()
def sample_continuations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int,
                         ecfg: EvalConfig, eos_id: int,
                         processors: LogitsProcessorList | None = None) -> torch.Tensor:
    """`copies` sampled continuations of each left-padded prompt, (prompts x copies, new tokens), rows grouped
    by prompt. Each prompt is encoded once and its KV cache repeated; a row that samples EOS is padded with
    EOS from then on, as `generate` does. `processors` see the whole sequence so far, as in `generate`."""
    cache_name = cache_argument(model)
    cache = Cache(layer_class_to_replicate=functools.partial(ReservedLayer,
                                                             input_ids.shape[1] + ecfg.max_new_tokens))
    positions = position_ids(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   **{cache_name: cache}).logits[:, -1]
    cache.batch_repeat_interleave(copies)
    logits = logits.repeat_interleave(copies, 0)
    mask = attention_mask.repeat_interleave(copies, 0)
    position = positions[:, -1:].repeat_interleave(copies, 0)
    sequence = input_ids.repeat_interleave(copies, 0)
    finished = torch.zeros(len(sequence), dtype=torch.bool, device=sequence.device)
    for step in range(ecfg.max_new_tokens):
        scores = processors(sequence, logits.float()) if processors else logits
        token = draw(*sampling_candidates(scores, ecfg.top_p, ecfg.top_k, ecfg.temperature))
        token = token.masked_fill(finished, eos_id)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        finished |= token == eos_id
        if step == ecfg.max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       **{cache_name: cache}).logits[:, -1]
    return sequence[:, input_ids.shape[1]:]


class BlockTokens(LogitsProcessor):
    """Never samples the given token ids (conditional training's control tokens)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token_ids] = -float("inf")
        return scores


@torch.no_grad()
def generate(model, tok, prompts: list[str], ecfg: EvalConfig, max_prompt_tokens: int,
             processors: Callable[[], LogitsProcessorList] | None = None, prefix: str = "",
             journal: Journal | None = None) -> list[list[str]]:
    """`num_samples` sampled continuations per prompt (sample_continuations: top-p, top-k, temperature and new
    tokens from config), seeded per batch of `prompt_batch_size` prompts; `processors` makes fresh logits
    processors for each batch (RAD). A `journal` keeps each finished batch and its seconds, so an interrupted
    build resumes at the first unfinished one (generation_seconds: the time over every attempt).

    `prefix` (a control token) goes before every prompt, inside its token budget; the control tokens are never
    sampled."""
    tok.padding_side, tok.truncation_side = "left", "left"
    if prefix:
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        max_prompt_tokens -= len(prefix_ids)
    blocked = [i for i in tok.convert_tokens_to_ids(list(CONTROL_TOKENS)) if i not in (None,
        tok.unk_token_id)]
    cut = sum(len(ids) > max_prompt_tokens for ids in tok(prompts)["input_ids"])
    if cut:
        log.warning(f"{cut} of {len(prompts)} prompts are longer than {max_prompt_tokens} tokens; "
                    "generation sees only their last tokens")
    out: list[list[str]] = []
    batches = range(0, len(prompts), ecfg.prompt_batch_size)
    for b, start in enumerate(tqdm(batches, desc="generate", disable=progress_bars_off())):
        batch = prompts[start: start + ecfg.prompt_batch_size]
        # batches are seeded apart: skipping one changes none
        if journal is not None and str(b) in journal.done:
            out += journal.done[str(b)]["texts"]
            continue
        started = time.perf_counter()
        if prefix:  # truncate the prompt alone, then put the prefix before it
            rows = [prefix_ids + ids for ids in tok(batch, truncation=True,
                                                    max_length=max_prompt_tokens)["input_ids"]]
            enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        else:
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens)
        logits_processors = LogitsProcessorList(processors() if processors else [])
        if blocked:
            logits_processors.append(BlockTokens(blocked))
        torch.manual_seed(ecfg.seed * 1_000_003 + b)
        generated = sample_continuations(model, enc["input_ids"], enc["attention_mask"], ecfg.num_samples,
                                         ecfg, tok.eos_token_id, logits_processors)
        texts = tok.batch_decode(generated, skip_special_tokens=True)
        grouped = [texts[i * ecfg.num_samples: (i + 1) * ecfg.num_samples] for i in range(len(batch))]
        if journal is not None:
            journal.record(str(b), {"texts": grouped, "seconds": time.perf_counter() - started})
        out += grouped
    return out


def generation_seconds(journal: Journal) -> float:
    """The seconds `generate` spent on the batches of `journal`, over every attempt of a resumed build."""
    return sum(batch["seconds"] for batch in journal.done.values())
