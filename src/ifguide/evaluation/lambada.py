"""LAMBADA accuracy (the fluency check of the paper's Table 6): greedy last-word and last-token prediction."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..artifacts import Run, Stage, fingerprint, write_json
from ..config import Config
from ..data import load_tokenizer, read_jsonl
from ..model import load_model, right_padded

log = logging.getLogger(__name__)

Cases = list[tuple[list[int], list[int]]]  # (context ids, target ids)


def lambada_cases(tok, passages: list[str]) -> tuple[Cases, Cases]:
    """(context ids, target ids) per passage, for the last word (" word", every BPE token of it) and for the
    last BPE token of the whole passage (the paper's figure)."""
    words, tokens = [], []
    for text in passages:
        context, word = text.rsplit(" ", 1)
        words.append((tok(context, add_special_tokens=False)["input_ids"],
                      tok(" " + word, add_special_tokens=False)["input_ids"]))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        tokens.append((ids[:-1], ids[-1:]))
    return words, tokens


@torch.no_grad()
def greedy_matches(model, cases: Cases, max_tokens: int, pad_id: int,
                   batch_size: int = 32) -> np.ndarray:
    """Per case, whether greedy decoding from the context reproduces every target token (teacher-forced
    argmax, which is the same test); contexts are cut from the left to fit `max_tokens`."""
    hits = []
    for start in range(0, len(cases), batch_size):
        chunk = [((c + t)[-max_tokens:], len(t)) for c, t in cases[start: start + batch_size]]
        ids, mask = right_padded([x for x, _ in chunk], pad_id)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for row, (x, n) in enumerate(chunk):
            hits.append(predicted[row, len(x) - n - 1: len(x) - 1].tolist() == x[len(x) - n:])
    return np.array(hits, dtype=bool)


def lambada_accuracy(model, tok, passages: list[str], max_tokens: int) -> dict:
    """LAMBADA accuracy: last word (greedy reproduces the whole word) and last BPE token of the passage."""
    words, tokens = lambada_cases(tok, passages)
    return {"last_word": float(greedy_matches(model, words, max_tokens, tok.pad_token_id).mean()),
            "last_token": float(greedy_matches(model, tokens, max_tokens, tok.pad_token_id).mean()),
            "passages": len(passages),
            "truncated": sum(len(c) + len(t) > max_tokens for c, t in words)}


def evaluate_lambada(cfg: Config, run: Run, model_name: str, force: bool = False) -> Path:
    """LAMBADA accuracy of a model into RUN/eval/MODEL/lambada/results.json (no sampling, no scorers)."""
    passages = [row["text"] for row in read_jsonl(run.data() / "prompts" / "lambada.jsonl")]
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    inputs = {"model": model_info["fingerprint"],
              "prompts": fingerprint(passages)}
    stage = Stage(run.eval(model_name, "lambada"), "eval", {"max_tokens": cfg.data.block_size}, inputs,
                  (run.model(model_name),))
    if stage.is_done(force):
        return stage.path
    with stage.build() as out:
        model, tok = load_model(run.model(model_name)), load_tokenizer(run.data())
        accuracy = lambada_accuracy(model, tok, passages, cfg.data.block_size)
        write_json(out / "results.json", {"model": model_name, "prompts": "lambada", "decoding": "sample",
                                          "lambada": accuracy, "scorers": {}})
    log.info(f"eval {model_name} on lambada: last-word accuracy {accuracy['last_word']:.1%}, last-token "
             f"{accuracy['last_token']:.1%} ({accuracy['passages']} passages, {accuracy['truncated']} cut to "
             f"{cfg.data.block_size} tokens)")
    return stage.path
