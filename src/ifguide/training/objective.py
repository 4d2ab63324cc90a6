"""The IF-Guide suppression objectives as a Trainer that changes only the loss.

Position convention, shared with the influence scores and the mask: position j of a block is the
prediction made from the hidden state at j, i.e. the cross-entropy of token j+1 given tokens <= j.
Unmarked positions always contribute their cross-entropy CE_j; a marked position contributes, by objective:

- `ascent` (the paper's Eq. 9): -lambda * CE_j, an unbounded gradient ascent on the token;
- `mask` (token-level filtering): nothing;
- `unlikelihood`: lambda * -log(1 - p_j), with p_j = exp(-CE_j) the probability of the token: bounded below
  by 0, it pushes p_j down and stops pushing as p_j reaches 0;
- `conditional`: CE_j like any position. The mask changes the data instead (conditional.py): marked sentences
  are learnt after a `<|misaligned|>` control token, and positions whose label is a control token carry no
  loss;
- `drop`: the mask changes the data too (drop.py): every document it touches leaves the corpus, and the model
  trains the full corpus's steps on the rest, as the blocklist filter does.

Every objective divides the sum by the number of label tokens, marked ones included, so they differ only in
the marked terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..model import position_ids
from ..names import OBJECTIVES

DATA_OBJECTIVES = {"conditional": "conditional_blocks", "drop": "blocks_without"}  # -> what makes their data
SPAN_COLUMNS = ("offset_mapping", "doc_id", "suppress")  # what SuppressionCollator reads and writes


def check_settings(lam: float, penalty_floor: float | None, objective: str) -> None:
    """One-line ValueErrors for a penalty weight, floor or objective the loss cannot take."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if penalty_floor is not None and not 0 < penalty_floor < 1:
        raise ValueError(f"penalty_floor must be in (0, 1) or None, got {penalty_floor}")
    if penalty_floor is not None and objective != "ascent":
        raise ValueError(f"penalty_floor acts only under objective 'ascent', not {objective!r}; drop it")


def check_loss_arguments(logits: torch.Tensor, labels: torch.Tensor, suppress: torch.Tensor | None,
                         lam: float,
                         penalty_floor: float | None, num_items: torch.Tensor | int | None,
                         objective: str, check_values: bool = True) -> None:
    """One-line ValueErrors for what would otherwise broadcast, mark everything or turn the loss into NaN;
    `check_values=False` skips the checks that read tensor values (a host sync on a GPU)."""
    check_settings(lam, penalty_floor, objective)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (batch, positions, vocabulary) and labels (batch, positions); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if objective in DATA_OBJECTIVES and suppress is not None:
        raise ValueError(f"objective {objective!r} changes the data, not the loss: pass blocks made by "
                         f"{DATA_OBJECTIVES[objective]} and suppress=None")
    if suppress is not None and suppress.shape != labels.shape:
        raise ValueError(f"suppress must have the shape of labels {tuple(labels.shape)}, got "
                         f"{tuple(suppress.shape)}")
    if not check_values:
        return
    if num_items is not None and not float(num_items) > 0:
        raise ValueError(f"num_items must be a positive token count, got {num_items}")
    if not torch.isfinite(logits.detach()).all():
        raise ValueError("logits hold NaN or infinite values; the model diverged or its inputs are broken")


def suppression_loss(logits: torch.Tensor, labels: torch.Tensor, suppress: torch.Tensor | None,
                     lam: float, penalty_floor: float | None = None,
                     num_items: torch.Tensor | int | None = None, objective: str = "ascent",
                     check_values: bool = True) -> torch.Tensor:
    """Sum over label positions of CE_j, or of the objective's term where `suppress[:, j]` is set (module
    doc), divided by the number of label tokens (or `num_items`). At lam = 0 every objective masks.

    With `penalty_floor` (ascent only), a marked token whose probability is already below the floor gets
    weight 0.
    """
    check_loss_arguments(logits, labels, suppress, lam, penalty_floor, num_items, objective, check_values)
    targets = labels[:, 1:]
    valid = targets != -100
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                         targets.reshape(-1), ignore_index=-100, reduction="none").view_as(targets)
    terms = ce * valid
    if suppress is not None:
        marked = marked_positions(suppress, labels)
        if objective == "ascent":
            penalty = -lam * ce
            if penalty_floor is not None:  # already improbable enough: no further push
                penalty = torch.where(ce.detach() < -math.log(penalty_floor), penalty,
                                      torch.zeros_like(penalty))
        elif objective == "unlikelihood":
            penalty = ce.new_zeros(ce.shape).masked_scatter(
                marked, -lam * log_complement(logits[:, :-1][marked].float(), targets[marked]))
        else:
            penalty = torch.zeros_like(ce)
        terms = torch.where(marked, penalty, terms)
    denominator = num_items if num_items is not None else valid.sum().clamp(min=1)
    return terms.sum() / denominator


def marked_positions(suppress: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, positions - 1): position j is marked and predicts a label (j + 1 is not -100)."""
    return suppress[:, :-1].bool() & (labels[:, 1:] != -100)


def log_complement(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(1 - p) of each row's target token, as the log-mass of the other tokens: exact, with a gradient, at
    any logit margin (1 - exp(-CE) rounds to 0 once p rounds to 1)."""
    others = logits.scatter(1, targets[:, None], -float("inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)


class SuppressionTrainer(Trainer):
    """A Hugging Face `Trainer` whose loss is a suppression objective (module doc; Eq. 9 by default).

    Batches carry a `suppress` column beside `input_ids` and `labels` (bool, the shape of `input_ids`; True at
    a position j penalises its prediction of token j+1): `SuppressionCollator` makes it from a span file, and
    `ifguide train` from a mask. Without the column the loss is plain cross-entropy; at lam = 0 the marked
    positions are masked. The columns the collator reads (`offset_mapping`, `doc_id`) survive
    `remove_unused_columns=True`. `suppressed_tokens` counts the marked positions trained on so far, and every
    log entry carries it.

    Arguments: those of `Trainer`, plus `lam` (λ, >= 0), `penalty_floor` (ascent: stop once p < floor, in (0,
    1)) and `objective` (ascent, mask, unlikelihood; conditional takes blocks made by `conditional_blocks`).

        collator = SuppressionCollator(SpanMask.load("mask.jsonl"), tok.eos_token_id)
        trainer = SuppressionTrainer(model=model, args=args, train_dataset=features, lam=1.0,
                                     data_collator=collator)
        trainer.train()
    """

    def __init__(self, *args, lam: float = 1.0, penalty_floor: float | None = None, objective: str = "ascent",
                 **kwargs):
        check_settings(lam, penalty_floor, objective)
        super().__init__(*args, **kwargs)
        self.lam = lam
        self.penalty_floor = penalty_floor
        self.objective = objective
        self._suppressed = 0  # a device tensor once counting starts: read only when logged, no sync per step
        self._finite = True  # likewise: whether every loss so far was finite
        self.loss_is_scaled_for_ga = True  # we always divide by the accumulated token count

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the span columns the collator needs when the Trainer drops the ones the model does not
        take."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in SPAN_COLUMNS if c not in self._signature_columns]

    @property
    def suppressed_tokens(self) -> int:
        """The marked positions trained on so far."""
        return int(self._suppressed)

    @suppressed_tokens.setter
    def suppressed_tokens(self, count: int) -> None:  # a resumed run carries its count on
        self._suppressed = count

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if not bool(self._finite):
            raise ValueError(f"the loss became NaN or infinite by step {self.state.global_step}; the model "
                             "diverged (lower the learning rate or lam) or its inputs are broken")
        super().log({**logs, "suppressed_tokens": self.suppressed_tokens}, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        missing = [key for key in ("input_ids", "labels") if key not in inputs]
        if missing:
            raise ValueError(f"SuppressionTrainer: the batch has no {', '.join(missing)}; use "
                             "SuppressionCollator or a collator that adds them")
        suppress = inputs.pop("suppress", None)
        labels = inputs.pop("labels")
        attention = inputs.get("attention_mask")
        # padding neither is a label nor predicts one, wherever it sits (left or right)
        if attention is not None:
            real = attention.bool()
            labels = labels.masked_fill(~real | ~torch.cat([real[:, :1], real[:, :-1]], dim=1), -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=attention,
                        position_ids=None if attention is None
                        else position_ids(attention))
        if num_items_in_batch is None:  # no accumulation count given: normalise per micro-batch and step
            # set by train()
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
            num_items_in_batch = (labels[:, 1:] != -100).sum() * steps
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items_in_batch = num_items_in_batch / self.accelerator.num_processes  # DDP sums the gradients
        if model.training and suppress is not None:
            self._suppressed = self._suppressed + marked_positions(suppress, labels).sum()
        loss = suppression_loss(outputs.logits, labels, suppress if model.training else None,
                                self.lam, self.penalty_floor, num_items_in_batch, self.objective,
                                check_values=False)
        self._finite = torch.isfinite(loss.detach()) & self._finite
        return (loss, outputs) if return_outputs else loss
