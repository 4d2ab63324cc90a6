"""Causal LMs from config (GPT-NeoX by default, Llama too) or from a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from .config import ModelConfig
from .errors import IfguideError


def build_model(cfg: ModelConfig, vocab_size: int, block_size: int, eos_id: int, seed: int) -> PreTrainedModel:
    """A freshly initialised model (seeded), or the checkpoint at `cfg.init_from`."""
    if cfg.init_from:
        return load_model(Path(cfg.init_from))
    if cfg.d_model % cfg.n_head:
        raise IfguideError(f"config: model.d_model ({cfg.d_model}) must be divisible by model.n_head ({cfg.n_head})")
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
        raise IfguideError(f"{path} is not a trained model directory; run `ifguide train` for it first")
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
