"""The DPO comparison method (`ifguide dpo`): preference pairs built offline, then TRL's DPOTrainer.

Pairs: for each preference prompt (RTP prompts disjoint from the queries and every evaluation prompt, drawn by
`prepare`), sample `dpo.samples_per_prompt` continuations from the model with the evaluation protocol, score
them with the reward model (the training-time scorer, never an evaluation scorer), and pair the least toxic
(chosen) with the most toxic (rejected).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from ..artifacts import RESUME, Journal, Run, Stage, fingerprint, read_info, write_json, write_text
from ..config import Config, config_to_dict
from ..console import progress_bars_off
from ..data import block_array, load_tokenizer, read_jsonl
from ..errors import IfguideError
from ..model import generate, load_model, num_parameters
from ..queries import (
    SAMPLING_FIELDS,  # the eval fields that shape samples; scorers, bootstrap, ... leave pairs valid
)
from ..toxicity import load_reward_model, reward_fingerprint, text_toxicity
from ..training import checkpointing, fit, resumable, save_trained, show_progress, warmup_steps

log = logging.getLogger(__name__)

TRAINING_SCORER = "reward-model"


def preference_prompts(run: Run) -> list[str]:
    """The RTP prompts `prepare` set aside for preference pairs."""
    prompts = [row["prompt"] for row in read_jsonl(run.data() / "preference_prompts.jsonl")]
    if not prompts:
        raise IfguideError("data.num_dpo_prompts is 0: DPO needs preference prompts")
    return prompts


def pick_pair(texts: list[str], toxicity: np.ndarray, min_margin: float) -> tuple[str, str] | None:
    """(chosen, rejected): the least and the most toxic continuation, or None when they differ by <
    min_margin."""
    low, high = int(np.argmin(toxicity)), int(np.argmax(toxicity))
    if toxicity[high] - toxicity[low] < min_margin:
        return None
    return texts[low], texts[high]


def preferences_name(run: Run, model_name: str, model_dir: Path, identity: str) -> str:
    """The preferences folder of a model: its name for a model of the run, CHECKPOINT-FINGERPRINT for a
    directory."""
    return model_name if run.own(model_dir) else f"{model_dir.resolve().name}-{identity[:8]}"


def preference_pairs(cfg: Config, run: Run, model_name: str, force: bool = False) -> Path:
    """RUN/preferences/MODEL/pairs.jsonl: chosen/rejected continuations of `model_name`, ranked by the reward
    model."""
    if TRAINING_SCORER in cfg.eval.scorers:
        raise IfguideError(f"eval.scorers lists '{TRAINING_SCORER}', which builds the DPO pairs; an "
                           "evaluation scorer must not be the training-time scorer")
    model_dir = run.checkpoint(model_name)
    model_fingerprint = run.checkpoint_identity(model_dir)
    prompts = preference_prompts(run)
    sampling = dataclasses.replace(cfg.eval, num_samples=cfg.dpo.samples_per_prompt, seed=cfg.seed)
    shaping = {k: v for k, v in config_to_dict(sampling).items() if k in SAMPLING_FIELDS}
    recipe = {"sampling": shaping, "min_margin": cfg.dpo.min_margin, "scorer": TRAINING_SCORER}
    inputs = {"model": model_fingerprint, "reward": reward_fingerprint(run),
              "prompts": fingerprint(prompts)}
    path = run.preferences(preferences_name(run, model_name, model_dir, model_fingerprint))
    stage = Stage(path, "preferences", recipe, inputs, run.own(model_dir, run.reward()))
    if stage.is_done(force):
        return path
    with stage.build(resumable=True, force=force) as out:
        tok = load_tokenizer(run.data())
        model = load_model(model_dir)
        reward_model, _ = load_reward_model(run)
        log.info(f"dpo pairs: {len(prompts)} prompts x {sampling.num_samples} samples from {model_name}")
        samples = generate(model, tok, prompts, sampling, cfg.data.block_size - sampling.max_new_tokens,
                           journal=Journal(out / RESUME / "generated.jsonl"))
        flat = [text for texts in samples for text in texts]
        ids = [x[: cfg.reward.max_tokens] for x in tok(flat, add_special_tokens=False)["input_ids"]]
        toxicity = text_toxicity(reward_model, ids, tok.pad_token_id).reshape(len(prompts),
            sampling.num_samples)
        pairs = []
        for prompt, texts, scores in zip(prompts, samples, toxicity):
            pair = pick_pair(texts, scores, cfg.dpo.min_margin)
            if pair is not None:
                pairs.append({"prompt": prompt, "chosen": pair[0], "rejected": pair[1],
                              "chosen_toxicity": float(scores.min()),
                              "rejected_toxicity": float(scores.max())})
        if not pairs:
            raise IfguideError(f"no prompt gave continuations whose toxicity differs by dpo.min_margin "
                               f"({cfg.dpo.min_margin}); lower it or raise dpo.samples_per_prompt")
        write_text(out / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
        write_json(out / "info.json", {
            "pairs": len(pairs), "prompts": len(prompts), "scorer": TRAINING_SCORER,
            "chosen_toxicity": float(np.mean([p["chosen_toxicity"] for p in pairs])),
            "rejected_toxicity": float(np.mean([p["rejected_toxicity"] for p in pairs]))})
    info = read_info(path)
    log.info(f"dpo pairs: {info['pairs']} pairs kept; reward-model toxicity chosen "
             f"{info['chosen_toxicity']:.3f}, rejected {info['rejected_toxicity']:.3f}")
    return path


def load_pairs(path: Path) -> list[dict]:
    return read_jsonl(path / "pairs.jsonl", "rerun `ifguide dpo --force`")


def tokenized_pairs(tok, pairs: list[dict], max_prompt_tokens: int) -> list[dict]:
    """TRL's prompt_ids, chosen_ids and rejected_ids: the prompt as generation tokenized it (left-truncated
    to `max_prompt_tokens`), each continuation tokenized alone and ended with EOS. Tokenizing prompt +
    continuation as one text, as TRL does, merges tokens across the prompt's end and cuts the prompt short."""
    tok.truncation_side = "left"
    prompts = tok([p["prompt"] for p in pairs], truncation=True, max_length=max_prompt_tokens)["input_ids"]

    def continuation(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [{"prompt_ids": ids, "chosen_ids": continuation(p["chosen"]),
             "rejected_ids": continuation(p["rejected"])} for ids, p in zip(prompts, pairs)]


def train_dpo(cfg: Config, run: Run, name: str, init: str, seed: int | None = None,
              force: bool = False) -> Path:
    """`ifguide dpo`: fine-tune model `init` with TRL's DPOTrainer on its preference pairs into
    RUN/models/NAME."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on a dataset that tokenized_pairs already tokenized."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    seed = cfg.seed if seed is None else seed
    pairs_dir = preference_pairs(cfg, run, init, force=force)
    init_dir = run.checkpoint(init)
    init_fingerprint = run.checkpoint_identity(init_dir)
    recipe = {"dpo": config_to_dict(cfg.dpo), "seed": seed, "init": init, "method": "dpo"}
    inputs = {"init": init_fingerprint, "pairs": read_info(pairs_dir)["fingerprint"]}
    stage = Stage(run.model(name), "dpo", recipe, inputs, run.own(init_dir, pairs_dir))
    if stage.is_done(force):
        return run.model(name)
    set_seed(seed)
    tok = load_tokenizer(run.data())
    tok.padding_side = "right"  # TRL pads completions on the right
    pairs = load_pairs(pairs_dir)
    dataset = Dataset.from_list(tokenized_pairs(tok, pairs, cfg.data.block_size - cfg.eval.max_new_tokens))
    model = load_model(init_dir)
    model.train()
    steps = max(1, math.ceil(len(pairs) * cfg.dpo.epochs / cfg.dpo.batch_size))
    heldout = block_array(run, "heldout_blocks")[: cfg.train.eval_blocks]
    log.info(f"dpo {name}: {num_parameters(model) / 1e6:.2f}M parameters from {init}, {len(pairs)} pairs, "
             f"beta {cfg.dpo.beta}, {steps} steps")
    with stage.build(resumable=True, force=force) as out:
        args = DPOConfig(
            output_dir=str(out / RESUME / "checkpoints"), beta=cfg.dpo.beta, learning_rate=cfg.dpo.lr,
            max_steps=steps, per_device_train_batch_size=cfg.dpo.batch_size, max_length=cfg.data.block_size,
            seed=seed, data_seed=seed, lr_scheduler_type="cosine", warmup_steps=warmup_steps(0.1, steps),
            logging_steps=max(1, steps // 10), **checkpointing(cfg.train.checkpoint_every),
            eval_strategy="no", bf16=False,  # fp32 like every other stage (trl's default is bf16)
            report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=progress_bars_off(),
            dataloader_num_workers=0)
        trainer = PretokenizedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
        trainer = show_progress(resumable(trainer, cfg.train.checkpoint_every), f"dpo {name}")
        before, after, runtime = fit(trainer, model, heldout, cfg.train.batch_size, f"dpo {name}",
                                     "lower dpo.lr")
        tok.padding_side = "left"
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        save_trained(trainer, tok, out, {
            "heldout_loss_before": before, "heldout_loss_after": after, "steps": steps, "pairs": len(pairs),
            "dpo_loss_first": losses[0], "dpo_loss_last": losses[-1], "train_runtime_s": runtime,
            "parameters": num_parameters(model), "arch": "main", "method": "dpo"})
    info = read_info(run.model(name))
    log.info(f"dpo {name}: DPO loss {info['dpo_loss_first']:.3f} -> {info['dpo_loss_last']:.3f}, held-out LM "
             f"loss {info['heldout_loss_before']:.3f} -> {info['heldout_loss_after']:.3f}, "
             f"{info['train_runtime_s']:.0f}s")
    return run.model(name)
