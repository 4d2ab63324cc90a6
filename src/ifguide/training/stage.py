"""Stage 2 (`ifguide train`): baseline, filtered and IF-Guide models with the Hugging Face Trainer."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from ..artifacts import RESUME, Run, Stage, read_info, write_json
from ..config import Config, config_to_dict, with_overrides
from ..console import progress_bars_off
from ..data import (
    CONTROL_TOKENS,
    BlockDataset,
    block_array,
    control_token_ids,
    load_blocks,
    load_tokenizer,
    sentence_ends,
    token_texts,
    training_blocks,
)
from ..errors import IfguideError, Interrupted
from ..model import build_model, fit_checkpoint, load_model, num_parameters
from ..names import LAMBDA_OBJECTIVES
from .arguments import check_training
from .conditional import conditional_blocks
from .drop import blocks_without, dropped_documents
from .objective import SuppressionTrainer
from .progress import show_progress

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_nll(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood over fixed-length blocks, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(np.array(blocks[start: start + batch_size], dtype=np.int64),
                              device=model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def training_steps(cfg: Config, n_blocks: int) -> int:
    """Optimizer steps of one run; every method trains for the steps of the full corpus."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(n_blocks * cfg.train.epochs / per_step))


def matched_steps(steps: int, marked_share: float) -> int:
    """The steps after which a run that leaves `marked_share` of its tokens out of the usual loss has learned
    as many tokens as `steps` of unmarked training: what the filter learns in the full corpus's steps."""
    if not 0 <= marked_share < 1:
        raise IfguideError(f"the mask marks {marked_share:.1%} of the tokens; --matched-tokens needs a share "
                           "below 100%")
    return math.ceil(steps / (1 - marked_share))


def warmup_steps(ratio: float, steps: int) -> int:
    """The linear warmup as a whole number of steps: transformers 4.x reads a float `warmup_steps` as steps,
    5.x as a ratio when below 1; an integer means the same to both (5.x rounds a ratio up the same way)."""
    return math.ceil(ratio * steps)


def distributed() -> tuple[int, int]:
    """(rank, world size) under `torchrun` or `accelerate launch`; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train(cfg: Config, run: Run, name: str, *, seed: int | None = None, mask: str | None = None,
          lam: float | None = None, init: str | None = None, data: str = "full", arch: str = "main",
          epochs: float | None = None, objective: str | None = None, matched_tokens: bool = False,
          force: bool = False) -> Path:
    """Train (or fine-tune from `init`) model `name`; skipped when its recipe is unchanged. `matched_tokens`:
    train a masking run for more steps, so that it learns as many tokens as usual as the filter does."""
    cfg = with_overrides(with_overrides(cfg, "train", lam=lam, epochs=epochs, objective=objective), None,
                         seed=seed)
    # lam, objective: the flags given
    checked = check_training(cfg, run, mask, init, arch, lam, objective, matched_tokens)
    seed, lam = cfg.seed, cfg.train.lam
    model_cfg, data_info, mask_info = checked.model, checked.data_info, checked.mask_info
    block_set, blocks_fp = training_blocks(data_info, data)
    inputs = {"data": data_info["fingerprint"]}
    if mask:
        inputs["mask"] = mask_info["fingerprint"]
        if mask_info.get("blocks_fingerprint") != blocks_fp:
            other = "the filtered" if data == "full" else "the full"
            raise IfguideError(f"mask '{mask}' was selected on {other} corpus's blocks; train it with --data "
                               f"{'filter' if data == 'full' else 'full'}, or select a mask on these blocks")
    start_from = checked.start_from  # found and checked current by check_training
    if start_from is not None:
        inputs["init"] = run.checkpoint_identity(start_from)
    rank, world = distributed()
    if cfg.train.batch_size % world:
        raise IfguideError(f"train.batch_size {cfg.train.batch_size} (the batch of one step over all "
                           f"processes) must divide by the {world} processes")
    settings = {k: v for k, v in config_to_dict(cfg.train).items()
                if k not in OUTCOME_FREE and (mask or k not in PENALTY_SETTINGS)}
    recipe = {"train": settings, "model": config_to_dict(model_cfg), "seed": seed,
              "lam": lam if mask else 0.0, "data": data, "mask": mask, "init": init,
              **({"matched_tokens": True} if matched_tokens else {})}
    stage = Stage(run.model(name), "train", recipe, inputs,
                  run.own(run.data(), run.mask(mask) if mask else None, start_from))
    if stage.is_done(force):
        return run.model(name)
    checkpoints = stage.partial / RESUME / "checkpoints"  # every rank resumes from rank 0's checkpoints
    with stage.build(resumable=True, force=force) if rank == 0 else _scratch() as out:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_seed(seed)
        tok = load_tokenizer(run.data())
        ids = block_array(run, block_set)
        suppress, unlabelled = None, ()
        if mask:
            from ..selection import load_mask

            suppress = load_mask(run.mask(mask), expect_blocks=blocks_fp)
        if cfg.train.objective == "conditional":
            aligned, misaligned = control_token_ids(tok)
            ids = conditional_blocks(ids, suppress.dense(), sentence_ends(token_texts(tok), tok.eos_token_id),
                                     aligned, misaligned)
            suppress, unlabelled = None, (aligned, misaligned)
        dropped = 0.0 if data == "full" else data_info["summary"]["blocklisted_token_share"]
        if cfg.train.objective == "drop":
            doc_ids = np.asarray(load_blocks(run.data(), block_set).with_format("numpy")["doc_ids"])
            kept = blocks_without(ids, doc_ids, dropped_documents(doc_ids, suppress.dense()))
            dropped = 1 - (1 - dropped) * len(kept) / len(ids)
            ids, suppress = kept, None
        heldout = block_array(run, "heldout_blocks")[: cfg.train.eval_blocks]
        steps = training_steps(cfg, len(block_array(run)))  # the full corpus's steps, whatever the data
        if matched_tokens:
            steps = matched_steps(steps, mask_info["marked_share"])
        if start_from is not None:
            model = load_model(start_from)
            fit_checkpoint(model, len(tok), cfg.data.block_size, f"checkpoint {start_from}",
                           len(CONTROL_TOKENS))
        else:
            model = build_model(model_cfg, len(tok), cfg.data.block_size, tok.eos_token_id, seed)
        if rank == 0:
            log.info(f"train {name}: {num_parameters(model) / 1e6:.2f}M parameters, {len(ids):,} "
                     f"blocks, {steps} steps"
                     + (f", mask '{mask}' {cfg.train.objective}" if mask else "")
                     + (f" lambda={lam}" if mask and cfg.train.objective in LAMBDA_OBJECTIVES else "")
                     + (f", from {start_from}" if start_from else "")
                     + (f", {world} processes" if world > 1 else ""))
        # Under torchrun / accelerate launch every process trains; only rank 0 writes the artifact.
        args = TrainingArguments(
            output_dir=str(checkpoints), per_device_train_batch_size=cfg.train.batch_size // world,
            gradient_accumulation_steps=cfg.train.grad_accum,
            learning_rate=cfg.train.lr, adam_beta1=cfg.train.betas[0], adam_beta2=cfg.train.betas[1],
            weight_decay=cfg.train.weight_decay, warmup_steps=warmup_steps(cfg.train.warmup_ratio, steps),
            lr_scheduler_type=cfg.train.scheduler, max_steps=steps, seed=seed, data_seed=seed,
            logging_steps=cfg.train.logging_steps, **checkpointing(cfg.train.checkpoint_every),
            eval_strategy="no",
            report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=progress_bars_off(),
        )
        dataset = BlockDataset(ids, suppress, unlabelled)
        trainer = SuppressionTrainer(model=model, args=args, train_dataset=dataset,
                                     lam=lam if suppress is not None else 0.0,
                                     penalty_floor=cfg.train.penalty_floor if suppress is not None else None,
                                     objective=cfg.train.objective)
        show_progress(resumable(trainer, cfg.train.checkpoint_every), f"train {name}")
        before, after, runtime = fit(trainer, model, heldout, cfg.train.batch_size, f"train {name}",
                                     "lower train.lam or set train.penalty_floor (e.g. 1e-4) to "
                                     "bound the penalty",
                                     rank)
        tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
        save_trained(trainer, tok, out, {
            "heldout_loss_before": before, "heldout_loss_after": after, "steps": steps,
            "train_tokens": tokens, "train_runtime_s": runtime, "tokens_per_s": tokens / runtime,
            "parameters": num_parameters(model), "arch": arch, "query_labeller": mask_info.get("labeller"),
            "objective": cfg.train.objective if mask else None, "blocks": len(ids),
            # epochs over its own blocks
            "epochs": steps * cfg.train.batch_size * cfg.train.grad_accum / max(len(ids), 1),
            # the share of the corpus's training tokens this model did not learn as usual (the filter's cost)
            "dropped_token_share": dropped,
            "penalised_token_share": 0.0 if cfg.train.objective == "drop"
            else mask_info.get("marked_share", 0.0) * (1 - dropped)})
    if rank:
        return run.model(name)
    info = read_info(run.model(name))
    log.info(f"train {name}: held-out loss {info['heldout_loss_before']:.3f} -> "
             f"{info['heldout_loss_after']:.3f}, {info['tokens_per_s']:,.0f} tokens/s, "
             f"{info['train_runtime_s']:.0f}s")
    return run.model(name)


OUTCOME_FREE = ("checkpoint_every",)  # train settings that do not change the trained model
PENALTY_SETTINGS = ("lam", "objective", "penalty_floor")  # act on a mask's tokens only: not in a plain recipe
PROGRESS_FILE = "ifguide_progress.json"  # in each checkpoint: training seconds and suppressed tokens so far
# saved last (PROGRESS_FILE after the Trainer's own): their presence = whole
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", PROGRESS_FILE)


CHECKPOINT_SECONDS = 120.0  # the default cadence: a checkpoint every 2 minutes of training (and every tenth)


def checkpointing(every: int | None) -> dict:
    """The Trainer's checkpoint settings: a checkpoint every `every` steps (0: none; None: by wall time, see
    TimedCheckpoints), the last two kept."""
    return {"save_strategy": "steps" if every else "no", "save_steps": every or 500, "save_total_limit": 2}


class TimedCheckpoints(TrainerCallback):
    """Asks for a checkpoint at every tenth of the steps and whenever `seconds` of training have passed
    since the last one, so that an interrupted run of any length resumes with at most a tenth of it (or
    `seconds`) to redo."""

    AGREE_EVERY = 10  # steps between the processes' agreements on the clock under torchrun (one collective)
    PARTS = 10

    def __init__(self, seconds: float = CHECKPOINT_SECONDS):
        self.seconds, self.last = seconds, time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.last >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            due = due and not state.global_step % self.AGREE_EVERY
            if not state.global_step % self.AGREE_EVERY:
                flag = torch.tensor([float(due)], device=args.device)
                torch.distributed.broadcast(flag, 0)  # every process saves at the step rank 0's clock chose
                due = bool(flag.item())
        if due or not state.global_step % max(1, math.ceil(state.max_steps / self.PARTS)):
            control.should_save, self.last = True, time.monotonic()


class CarriedProgress(TrainerCallback):
    """Writes into each checkpoint the seconds trained over every attempt so far and the suppressed-token
    count, so that a resumed run reports what an uninterrupted one would (wall time: the total)."""

    def __init__(self, trainer, earlier_s: float):
        self.trainer, self.earlier_s, self.started = trainer, earlier_s, time.monotonic()

    def seconds(self) -> float:
        return self.earlier_s + time.monotonic() - self.started

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / PROGRESS_FILE, {"train_s": self.seconds(), "suppressed_tokens":
                                                getattr(self.trainer, "suppressed_tokens", 0)})


def resumable(trainer, every: int | None):
    """`trainer` with wall-time checkpoints when `every` (train.checkpoint_every) is None."""
    if every is None:
        trainer.add_callback(TimedCheckpoints())
    return trainer


def fit(trainer, model: torch.nn.Module, heldout: np.ndarray, batch_size: int, label: str, diverged_hint: str,
        rank: int = 0) -> tuple[float, float, float]:
    """Train to the end, resuming from the last complete checkpoint in the trainer's output_dir (and saying
    so): held-out loss before and after, and the seconds trained over every attempt."""
    # Held-out loss outside the Trainer: an evaluate() before train() would keep it from wrapping the model in
    # DistributedDataParallel under torchrun (transformers 5), and the processes would train apart.
    before = mean_nll(model, heldout, batch_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has cleared a stale build before any process looks for one
    resume = last_checkpoint(Path(trainer.args.output_dir))
    if resume is not None:
        if rank == 0:
            log.info(f"{label}: resuming from step {checkpoint_step(resume)} ({resume})")
        # from_pretrained maps the saved names back (the Trainer's own weight loading misses GPT-NeoX's
        # renamed head under transformers 5); the Trainer then restores optimizer, scheduler, RNG states and
        # data order
        model.load_state_dict(load_model(resume).state_dict())
    carried = json.loads((resume / PROGRESS_FILE).read_text()) if resume is not None else {}
    if hasattr(trainer, "suppressed_tokens"):
        trainer.suppressed_tokens = carried.get("suppressed_tokens", 0)
    progress = CarriedProgress(trainer, carried.get("train_s", 0.0))
    trainer.add_callback(progress)
    try:
        with quiet_trainer_loading(resume is not None):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        saved = last_checkpoint(Path(trainer.args.output_dir))
        raise Interrupted(f"{label}: interrupted at step {trainer.state.global_step}; "
                          + (f"rerun the same command to resume from step {checkpoint_step(saved)}"
                             if saved else "no checkpoint yet; a rerun starts over")) from None
    after = mean_nll(model, heldout, batch_size)
    if not math.isfinite(after):
        raise IfguideError(f"{label}: held-out loss diverged to {after}; {diverged_hint}")
    return before, after, progress.seconds()


def save_trained(trainer, tok, out: Path, info: dict) -> None:
    """The trained model, its tokenizer, info.json and the Trainer's log into the build folder `out`."""
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    write_json(out / "info.json", info)
    write_json(out / "train_log.json", trainer.state.log_history)


@contextlib.contextmanager
def quiet_trainer_loading(active: bool):
    """Silence the Trainer's missing/unexpected-key warnings while it reloads weights `train` already
    loaded."""
    logger = logging.getLogger("transformers.trainer")
    level = logger.level
    if active:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def last_checkpoint(folder: Path) -> Path | None:
    """The latest complete `checkpoint-STEP` folder (a kill during a save leaves the one before it)."""
    complete = [c for c in folder.glob("checkpoint-*") if checkpoint_step(c) is not None
                and all((c / f).is_file() for f in CHECKPOINT_FILES)]
    return max(complete, key=checkpoint_step, default=None)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a `checkpoint-STEP` folder; None for another name."""
    step = folder.name.removeprefix("checkpoint-")
    return int(step) if step.isdigit() and folder.name != step else None


@contextlib.contextmanager
def _scratch():
    """A throwaway output folder for the processes other than rank 0."""
    with tempfile.TemporaryDirectory(prefix="ifguide-rank-") as folder:
        yield Path(folder)
