"""ifguide: influence-guided suppression of toxic training tokens (IF-Guide).

The public Python API, for training loops outside `ifguide train`: the suppression objective
(`suppression_loss`, `SuppressionTrainer`), masks in document coordinates (`SpanMask`, `document_id`) and the
collator that turns them into the `suppress` column of tokenized batches (`SuppressionCollator`). Importing
`ifguide` loads none of torch, transformers or datasets; each name loads its module on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._face import face

__version__ = "0.1.0"
# a library shows nothing unless asked (console.py)
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__, __getattr__ = face(__name__, {
    "training.objective": ["suppression_loss", "SuppressionTrainer"],
    "selection.spans": ["SpanMask", "SuppressionCollator", "document_id"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .selection.spans import SpanMask, SuppressionCollator, document_id
    from .training.objective import SuppressionTrainer, suppression_loss
