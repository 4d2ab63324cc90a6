"""Causal LMs from config (GPT-NeoX by default, Llama too) or from a local Hugging Face directory, and
sampling from them: the one model layer every stage after `data` shares."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, GPTNeoXConfig, LlamaConfig, PreTrainedModel
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from .artifacts import Journal, Run, damaged, read_info
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


@functools.cache
def checkpoint_fingerprint(path: Path) -> str:
    """A hash of a checkpoint's config and weight files: a model trained from it is rebuilt when it
    changes."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in (".safetensors", ".bin"):
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


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


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cache_argument(model: nn.Module) -> str:
    """What this transformers version calls the KV-cache argument: `cache` (from 5.2x) or
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 copies: int) -> DynamicCache | None:
    """The KV cache of every prompt token but the last, computed once per left-padded prompt and repeated
    `copies` times row by row: `generate` with `num_return_sequences` would recompute the prompt for every
    sample."""
    if input_ids.shape[1] < 2:
        return None
    cache = DynamicCache()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate places left-padded prompts
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
          use_cache=True, **{cache_argument(model): cache})
    cache.batch_repeat_interleave(copies)
    return cache


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
    """`num_samples` sampled continuations per prompt (top-p, top-k, new tokens from config), seeded per
    batch; `processors` makes fresh logits processors for each batch (RAD). Each prompt is encoded once
    (prompt_cache). A `journal` keeps each finished batch, so an interrupted build resumes at the first
    unfinished one.

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
    cache_name = cache_argument(model)
    batches = range(0, len(prompts), ecfg.prompt_batch_size)
    for b, start in enumerate(tqdm(batches, desc="generate", disable=progress_bars_off())):
        batch = prompts[start: start + ecfg.prompt_batch_size]
        # batches are seeded apart: skipping one changes none
        if journal is not None and str(b) in journal.done:
            out += journal.done[str(b)]
            continue
        if prefix:  # truncate the prompt alone, then put the prefix before it
            rows = [prefix_ids + ids for ids in tok(batch, truncation=True,
                                                    max_length=max_prompt_tokens)["input_ids"]]
            enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        else:
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits_processors = LogitsProcessorList(processors() if processors else [])
        if blocked:
            logits_processors.append(BlockTokens(blocked))
        cache = prompt_cache(model, ids, mask, ecfg.num_samples)
        torch.manual_seed(ecfg.seed * 1_000_003 + b)
        repeated = {"input_ids": ids.repeat_interleave(ecfg.num_samples, 0),
                    "attention_mask": mask.repeat_interleave(ecfg.num_samples, 0), cache_name: cache}
        generated = model.generate(**repeated, do_sample=True, top_p=ecfg.top_p, top_k=ecfg.top_k,
                                   temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens,
                                   pad_token_id=tok.pad_token_id, logits_processor=logits_processors)
        texts = tok.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        grouped = [texts[i * ecfg.num_samples: (i + 1) * ecfg.num_samples] for i in range(len(batch))]
        if journal is not None:
            journal.record(str(b), grouped)
        out += grouped
    return out


def init_checkpoint(run: Run, init: str, what: str = "--init") -> tuple[Path, str]:
    """`Run.checkpoint` with its fingerprint (`checkpoint_identity`)."""
    path = run.checkpoint(init, what)
    return path, checkpoint_identity(run, path)


def checkpoint_identity(run: Run, path: Path) -> str:
    """A checkpoint's fingerprint: the recorded one for a model of this run, else a hash of its files."""
    return read_info(path)["fingerprint"] if run.own(path) else checkpoint_fingerprint(path.resolve())
