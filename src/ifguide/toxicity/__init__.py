"""The judges of toxicity: the registered offline scorers and the run's reward model (`ifguide reward`).

Evaluation scores generations with them, self-queries are labelled by one of them, DPO and RAD are steered by
the reward model. Imports data and model (the reward model is a small classifier on the run's tokenizer).
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "scorers": ["SCORERS", "check_scorer", "get_scorer"],
    "reward": ["load_reward_model", "reward_fingerprint", "text_toxicity", "train_reward_model"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .reward import load_reward_model, reward_fingerprint, text_toxicity, train_reward_model
    from .scorers import SCORERS, check_scorer, get_scorer
