"""Stage 5: training with the suppression objective.

objective holds the loss and the Trainer that applies it (the public API), conditional the data of conditional
training; stage holds `ifguide train`: baseline,
filtered and IF-Guide models on the run's blocks. Imports data, model and selection (masks).
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "objective": ["SuppressionTrainer", "suppression_loss"],
    "arguments": ["check_training"],
    "conditional": ["conditional_blocks"],
    "progress": ["BAR_POSITION", "show_progress"],
    "stage": ["checkpointing", "fit", "mean_nll", "resumable", "save_trained", "train", "warmup_steps"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .arguments import check_training
    from .conditional import conditional_blocks
    from .objective import SuppressionTrainer, suppression_loss
    from .progress import BAR_POSITION, show_progress
    from .stage import checkpointing, fit, mean_nll, resumable, save_trained, train, warmup_steps
