"""The defences IF-Guide is compared against, beyond the data filter: DPO fine-tuning on reward-labelled pairs
(`ifguide dpo`) and RAD, reward-augmented decoding. Imports data, model, toxicity, queries and training."""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "dpo": ["train_dpo"],
    "rad": ["rad_processors"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .dpo import train_dpo
    from .rad import rad_processors
