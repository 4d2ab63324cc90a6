"""What influence is measured on: the next-token task, the tracked modules and the signed query rows."""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.task import Task
from torch import nn

from ..errors import IfguideError
from ..names import QueryKind
from ..queries import SET_COLUMN

QUERY_KINDS = (*get_args(QueryKind), "nontoxic")  # the settings, and the non-toxic side alone


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label of position t is token t+1; the last position has none (-100)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def weighted_query_loss(batch: dict, model: nn.Module) -> torch.Tensor:
    """sum_r w_r * L_r: each row's summed continuation loss times its signed weight."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = next_token_labels(batch["labels"])
    per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (per_token.sum(dim=1) * batch["weight"]).sum()


class LanguageModelTask(Task):
    """Kronfluence task: summed next-token loss for training, signed weighted query loss as measurement."""

    def __init__(self, tracked_modules: list[str]):
        self.tracked_modules = tracked_modules

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits.float()
        logits = logits.view(-1, logits.size(-1))  # whole tensor, no slice: labels shift instead (no copies)
        labels = next_token_labels(batch["labels"]).view(-1)
        if sample:  # the Fisher uses labels sampled from the model
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
                labels = sampled.masked_fill(labels == -100, -100)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return weighted_query_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor | None:
        return batch.get("attention_mask")


def discover_tracked_modules(model: nn.Module, override: list[str] | None = None,
                             last_layers: int | None = None, include_head: bool = False,
                             head_max_vocab: int | None = None) -> list[str]:
    """Every nn.Linear inside the (last `last_layers`) transformer blocks, never embeddings; the LM head too
    with `include_head`; or `override`.

    Tracking only the last blocks also shortens the backward (and forward-mode) pass: derivatives are needed
    only from the lowest tracked module on.
    """
    modules = dict(model.named_modules())
    if override:
        bad = [name for name in override if not isinstance(modules.get(name), nn.Linear)]
        if bad:
            raise IfguideError("config: influence.tracked_modules names no nn.Linear module: "
                               f"{', '.join(bad)}")
        return list(override)
    blocks = max((m for m in modules.values() if isinstance(m, nn.ModuleList)),
                 key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    if blocks is None:
        raise IfguideError("could not find the transformer blocks (no nn.ModuleList); set "
                           "influence.tracked_modules")
    prefix = next(name for name, m in modules.items() if m is blocks) + "."
    kept = range(len(blocks))[-last_layers:] if last_layers else range(len(blocks))
    inside = {name: m for name, m in modules.items()
              if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) in kept}
    if any(type(m).__name__ == "Conv1D" for m in inside.values()):
        raise IfguideError("this model still has GPT-2 Conv1D layers, which Kronfluence does not track; "
                           "pass it through ifguide.model.with_linear_projections first")
    tracked = [name for name, m in inside.items() if isinstance(m, nn.Linear)]
    if not tracked:
        raise IfguideError("no nn.Linear modules inside the transformer blocks; set "
                           "influence.tracked_modules")
    return tracked + ([head_module(model, head_max_vocab)] if include_head else [])


def head_module(model: nn.Module, max_vocab: int | None = None) -> str:
    """The name of the output layer (GPT-NeoX `embed_out`, Llama and GPT-2 `lm_head`), refused when its EK-FAC
    (a vocab x vocab gradient covariance and eigenbasis, 8 V^2 bytes in float32) would not fit `max_vocab`."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or name is None:
        raise IfguideError("influence.include_head: this model's output layer is not an nn.Linear")
    vocab = head.out_features
    if max_vocab is not None and vocab > max_vocab:
        raise IfguideError(f"influence.include_head: the LM head's EK-FAC needs two {vocab:,} x {vocab:,} "
                           f"matrices ({8 * vocab ** 2 / 2 ** 30:.1f} GiB); above influence.head_max_vocab "
                           f"({max_vocab:,}), so set include_head: false (or raise head_max_vocab if the "
                           "memory is there)")
    return name


def query_weights(toxic: np.ndarray, kind: str, sets: np.ndarray | None = None) -> np.ndarray:
    """Signed per-row weights: toxic-minus-nontoxic = +1/|T| on toxic, -1/|N| on non-toxic rows; with `sets`
    (each row's query set), each set's weights over the number of sets, so every set weighs the same.

    A kind that needs a side with no rows is refused (a "differential" query of one side is not differential).
    """
    toxic = np.asarray(toxic, dtype=bool)
    if sets is not None:
        sets = np.asarray(sets)
        weights = np.zeros(len(toxic), dtype=np.float32)
        names = np.unique(sets)
        for name in names:
            rows = sets == name
            weights[rows] = query_weights(toxic[rows], kind) / len(names)
        return weights
    n_toxic, n_nontoxic = int(toxic.sum()), int((~toxic).sum())
    if kind not in QUERY_KINDS:
        raise IfguideError(f"unknown query kind '{kind}' (use one of {', '.join(QUERY_KINDS)})")
    if kind != "nontoxic" and n_toxic == 0:
        raise IfguideError(f"query '{kind}' needs toxic queries, but the run has none; raise "
                           "data.num_toxic_queries")
    if kind != "toxic" and n_nontoxic == 0:
        raise IfguideError(f"query '{kind}' needs non-toxic queries, but the run has none; "
                           "raise data.num_nontoxic_queries or use --query toxic")
    weights = np.zeros(len(toxic), dtype=np.float32)
    if kind in ("toxic-minus-nontoxic", "toxic"):
        weights[toxic] = 1.0 / n_toxic
    if kind == "toxic-minus-nontoxic":
        weights[~toxic] = -1.0 / n_nontoxic
    if kind == "nontoxic":
        weights[~toxic] = 1.0 / n_nontoxic
    return weights


class QueryRows(torch.utils.data.Dataset):
    """Query rows with their signed weights (rows of weight 0 are dropped)."""

    def __init__(self, queries, kind: str):
        toxic = np.asarray(queries["toxic"], dtype=bool)
        pooled = SET_COLUMN in getattr(queries, "column_names", ())  # query sets pooled (`rtp+self`)
        weights = query_weights(toxic, kind, queries[SET_COLUMN] if pooled else None)
        keep = np.flatnonzero(weights != 0)
        self.rows = [{"input_ids": torch.tensor(queries[int(i)]["input_ids"]),
                      "attention_mask": torch.tensor(queries[int(i)]["attention_mask"]),
                      "labels": torch.tensor(queries[int(i)]["labels"]),
                      "weight": torch.tensor(weights[i])} for i in keep]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]
