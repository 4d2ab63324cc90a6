"""Training progress a person can read: one bar per training, named after the model, the latest loss beside
it, and no log dictionaries printed between bars (the Trainer's own printer and bar are replaced)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..console import progress_bars_off

# set per worker by the demo's parallel jobs: each bar keeps its own line
BAR_POSITION = "IFGUIDE_BAR_POSITION"


class TrainingProgress(TrainerCallback):
    """A tqdm bar over the optimizer steps, labelled `name`, with the last logged loss as its postfix."""

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not progress_bars_off():
            # a fixed line per worker only on a terminal: in a log file, cursor moves would show as stray `[A`
            position = int(os.environ.get(BAR_POSITION, "0")) if sys.stderr.isatty() else None
            self.bar = tqdm(total=state.max_steps, desc=self.name, position=position, leave=True, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def show_progress(trainer: Trainer, name: str) -> Trainer:
    """The trainer with its log printer and progress bar replaced by one `TrainingProgress` bar."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingProgress(name))
    return trainer
