"""Stages 6 and 7: judging models and reporting.

stage holds `ifguide eval` (generations under the RTP protocol, scored; perplexity), lambada the fluency
check, metrics the toxicity statistics; tables collects evaluations into per-method numbers and results writes
the `ifguide report` files. Imports everything below it: data, model, toxicity, training (perplexity),
baselines (RAD).
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["evaluate"],
    "results": ["DEMO_MARKER", "headline", "report"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .results import DEMO_MARKER, headline, report
    from .stage import evaluate
