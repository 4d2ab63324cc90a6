"""ifguide: influence-guided suppression of toxic training tokens (IF-Guide).

The public Python API, for training loops outside `ifguide train`: the suppression objective
(`suppression_loss`, `SuppressionTrainer`), masks in document coordinates (`SpanMask`, `document_id`) and the
collator that turns them into the `suppress` column of tokenized batches (`SuppressionCollator`). Importing
`ifguide` loads none of torch, transformers or datasets; each name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "suppression_loss": "training.objective", "SuppressionTrainer": "training.objective",
    "SpanMask": "selection.spans", "SuppressionCollator": "selection.spans", "document_id": "selection.spans",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'ifguide' has no attribute {name!r}")
