"""The IF-Guide suppression objective (paper Eq. 9) as a Trainer that changes only the loss.

Position convention, shared with the influence scores and the mask: position j of a block is the
prediction made from the hidden state at j, i.e. the cross-entropy of token j+1 given tokens <= j.
A marked position j gets weight -lambda on that term; unmarked positions get +1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import Trainer


def suppression_loss(logits: torch.Tensor, labels: torch.Tensor, suppress: torch.Tensor | None,
                     lam: float, penalty_floor: float | None = None,
                     num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Sum of w_j * CE_j over label positions, divided by the number of label tokens (or `num_items`).

    w_j = +1, or -lam where `suppress[:, j]` is set; with `penalty_floor`, a marked token whose
    probability is already below the floor gets weight 0 (the penalty is bounded below).
    """
    targets = labels[:, 1:]
    valid = targets != -100
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                         targets.reshape(-1), ignore_index=-100, reduction="none").view_as(targets)
    weights = valid.float()
    if suppress is not None and lam:
        marked = suppress[:, :-1].bool() & valid
        penalty = torch.full_like(weights, -lam)
        if penalty_floor is not None:  # already improbable enough: no further push
            penalty = torch.where(ce.detach() < -math.log(penalty_floor), penalty, torch.zeros_like(penalty))
        weights = torch.where(marked, penalty, weights)
    denominator = num_items if num_items is not None else valid.sum().clamp(min=1)
    return (weights * ce).sum() / denominator


class SuppressionTrainer(Trainer):
    """HF Trainer whose loss is Eq. 9; with no `suppress` column (or lam = 0) it is plain cross-entropy."""

    def __init__(self, *args, lam: float = 1.0, penalty_floor: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam = lam
        self.penalty_floor = penalty_floor
        self.loss_is_scaled_for_ga = True  # we always divide by the accumulated token count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        suppress = inputs.pop("suppress", None)
        labels = inputs.pop("labels")
        outputs = model(input_ids=inputs["input_ids"])
        if num_items_in_batch is None:  # no accumulation count given: normalise per micro-batch and step
            steps = self.current_gradient_accumulation_steps if model.training else 1
            num_items_in_batch = (labels[:, 1:] != -100).sum() * steps
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items_in_batch = num_items_in_batch / self.accelerator.num_processes  # DDP sums the gradients
        loss = suppression_loss(outputs.logits, labels, suppress if model.training else None,
                                self.lam, self.penalty_floor, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
