"""RAD's toxicity reward model, also DPO's training-time scorer (`ifguide reward`).

A small causal LM with the run's tokenizer and a one-output regression head at every position: the output at t
is the toxicity of the text up to t, so a prefix is scored incrementally with a KV cache. It is trained here
on labelled mirror text that none of the evaluation scorers was trained on (profanity-check: Davidson +
Jigsaw; jigsaw-lstm: Jigsaw; toxigen: ToxiGen).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForTokenClassification, GPTNeoXConfig, PreTrainedModel, set_seed

from ..artifacts import Run, Stage, write_json
from ..config import Config, config_to_dict
from ..console import progress_bars_off
from ..data import corpora, load_tokenizer
from ..errors import IfguideError
from ..model import right_padded

log = logging.getLogger(__name__)

EVAL_SCORER_DATA = {"davidson", "toxigen_demos"}  # labelled sources an evaluation scorer was trained on


def reward_documents(cfg: Config) -> list[tuple[str, bool]]:
    """(text, toxic) of the labelled sources in reward.sources, deduplicated and shuffled with the seed."""
    unknown = [s for s in cfg.reward.sources if not corpora.is_toxic_bearing(s)]
    if unknown or not cfg.reward.sources:
        labelled = sorted(s for s in corpora.CORPORA if corpora.is_toxic_bearing(s))
        raise IfguideError(f"config: reward.sources {unknown or '[]'} must name labelled mirror sources "
                           f"({', '.join(labelled)})")
    if EVAL_SCORER_DATA & set(cfg.reward.sources):
        raise IfguideError(f"config: reward.sources {sorted(EVAL_SCORER_DATA & set(cfg.reward.sources))} "
                           "trained an evaluation scorer; the reward model must be trained on other data")
    rows = {(text.strip(), toxic) for source in cfg.reward.sources
            for text, toxic in corpora.labelled_documents(source) if text.strip()}
    rows = sorted(rows)
    random.Random(cfg.seed).shuffle(rows)
    return rows


def build_reward_model(cfg: Config, vocab_size: int, pad_id: int) -> PreTrainedModel:
    """A GPT-NeoX body with a linear toxicity head at every position (logit of toxic)."""
    m = cfg.reward.model
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layer,
                           num_attention_heads=m.n_head, intermediate_size=m.d_ff,
                           max_position_embeddings=max(cfg.reward.max_tokens, cfg.eval.max_new_tokens) + 1,
                           num_labels=1, classifier_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                           rotary_pct=0.25, pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)
    torch.manual_seed(cfg.seed)
    return AutoModelForTokenClassification.from_config(config)


def prefix_loss(logits: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every prefix against its text's label, later prefixes weighted more (t /
    length), as RAD trains its reward model to score partial text."""
    position = mask.cumsum(1) * mask
    weight = position / position.sum(1, keepdim=True)
    target = labels[:, None].float().expand_as(weight)
    per_token = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
    return (per_token * weight).sum(1).mean()


@torch.no_grad()
def text_toxicity(model: PreTrainedModel, ids: list[list[int]], pad_id: int,
                  batch_size: int = 64) -> np.ndarray:
    """The reward model's toxicity of each whole token sequence (its output at the last token), from
    scratch."""
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = [x or [pad_id] for x in ids[start: start + batch_size]]
        input_ids, mask = right_padded(chunk, pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[..., 0]
        last = mask.sum(1) - 1
        out.append(torch.sigmoid(logits[torch.arange(len(chunk)), last]).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_reward_model(cfg: Config, run: Run, force: bool = False) -> Path:
    """`ifguide reward`: train the reward model into RUN/reward and record its held-out AUC."""
    from sklearn.metrics import roc_auc_score

    data_info = run.require(run.data(), "run `ifguide prepare` first")
    stage = Stage(run.reward(), "reward", {"reward": config_to_dict(cfg.reward), "seed": cfg.seed},
                  {"data": data_info["fingerprint"]}, (run.data(),))
    if stage.is_done(force):
        return run.reward()
    with stage.build() as out:
        set_seed(cfg.seed)
        tok = load_tokenizer(run.data())
        rows = reward_documents(cfg)
        encoded = tok([text for text, _ in rows], add_special_tokens=False)["input_ids"]
        examples = [(ids[: cfg.reward.max_tokens], toxic) for ids, (_, toxic) in zip(encoded, rows) if ids]
        cut = int(len(examples) * (1 - cfg.reward.heldout_fraction))
        train_rows, heldout = examples[:cut], examples[cut:]
        model = build_reward_model(cfg, len(tok), tok.pad_token_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.reward.lr, weight_decay=0.01)
        steps = int(np.ceil(len(train_rows) * cfg.reward.epochs / cfg.reward.batch_size))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.reward.lr, total_steps=steps,
                                                       pct_start=0.05)
        rng = np.random.default_rng(cfg.seed)
        order = np.concatenate([rng.permutation(len(train_rows))
                                for _ in range(int(np.ceil(cfg.reward.epochs)))])
        log.info(f"reward: {len(train_rows):,} training texts ({np.mean([t for _, t in train_rows]):.0%} "
                 f"toxic) from {', '.join(cfg.reward.sources)}; {steps} steps")
        model.train()
        losses = []
        for step in tqdm(range(steps), desc="reward model", disable=progress_bars_off()):
            picked = [train_rows[i] for i in order[step * cfg.reward.batch_size: (step
                + 1) * cfg.reward.batch_size]]
            input_ids, mask = right_padded([ids for ids, _ in picked], tok.pad_token_id)
            loss = prefix_loss(model(input_ids=input_ids, attention_mask=mask).logits, mask,
                               torch.tensor([t for _, t in picked]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        scores = text_toxicity(model, [ids for ids, _ in heldout], tok.pad_token_id)
        auc = float(roc_auc_score([t for _, t in heldout], scores))
        model.save_pretrained(str(out))
        write_json(out / "info.json", {"heldout_auc": auc, "train_texts": len(train_rows),
                                       "heldout_texts": len(heldout), "sources": cfg.reward.sources,
                                       "final_loss": float(np.mean(losses[-20:]))})
    log.info(f"reward: held-out AUC {auc:.3f} on {len(heldout):,} texts")
    return run.reward()


def _reward_info(run: Run) -> dict:
    return run.require(run.reward(), "run `ifguide reward` first")


def load_reward_model(run: Run) -> tuple[PreTrainedModel, dict]:
    """The trained reward model (eval mode) and its info.json."""
    info = _reward_info(run)
    model = AutoModelForTokenClassification.from_pretrained(str(run.reward()))
    model.eval()
    return model, info


def reward_fingerprint(run: Run) -> str:
    """The fingerprint of the trained reward model (an input of DPO pairs and RAD evaluations)."""
    return _reward_info(run)["fingerprint"]
