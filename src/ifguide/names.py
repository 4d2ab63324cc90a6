"""The vocabulary of a run, declared once: the enumerated settings (config types and CLI choices read them),
the methods a run compares (the report's rows, in order), and the rules that build and read model, evaluation
and sweep-point names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

# train.objective: see training/objective.py
Objective = Literal["ascent", "mask", "unlikelihood", "conditional", "drop"]
# select.method: see selection/stage.py
SelectMethod = Literal["paper", "documents", "blocklist-tokens", "sentence-labels", "labelled-documents"]
SCORED_METHODS = ("paper", "documents")  # the select methods that read influence scores
QueryKind = Literal["toxic-minus-nontoxic", "toxic"]  # influence.query
TokenScores = Literal["loss-term", "kronfluence"]  # influence.token_scores: see influence/token_scores.py
Normalize = Literal["none", "relative"]  # influence.normalize
Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]  # influence.strategy (Kronfluence)
ScoreDtype = Literal["float32", "float16"]  # influence.score_dtype
Arch = Literal["gpt_neox", "llama"]  # model.arch
CorpusFormat = Literal["jsonl", "txt", "parquet", "arrow"]  # data.corpus[].format
TxtSplit = Literal["file", "paragraph"]  # data.corpus[].txt_split
TrainingData = Literal["full", "filter"]  # the blocks a model trains on, or a score set covers (`--data`)
Decoding = Literal["sample", "rad"]  # `eval --decoding`
PromptSet = Literal["rtp", "bold", "toxigen", "attaq", "lambada"]  # the built-in evaluation prompt sets

MarkingUnit = Literal["tokens", "documents"]  # sweep.units: Algorithm 1's tokens, or whole documents
OBJECTIVES: tuple[str, ...] = get_args(Objective)
# the objectives that train on every block and leave the marked tokens out of the usual loss: a run of one can
# match the tokens the filter learns (`--matched-tokens`)
MASKING_OBJECTIVES = ("ascent", "mask", "unlikelihood")
LAMBDA_OBJECTIVES = ("ascent", "unlikelihood")  # the objectives lambda weighs; the others have none
MARKING_UNITS: tuple[str, ...] = get_args(MarkingUnit)
SELECT_METHODS: tuple[str, ...] = get_args(SelectMethod)
PROMPT_SETS: tuple[str, ...] = get_args(PromptSet)


@dataclass(frozen=True)
class Method:
    """A row of the comparison, and how the demo and the report treat it."""

    name: str
    comparison: bool = False  # a rival's cost: trained or decoded on demo.comparison_seeds only
    decodes: str | None = None  # a decoding-time method (RAD): the method whose models it decodes
    rival: bool = False  # IF-Guide's EMT is compared against it in the report


METHODS: tuple[Method, ...] = (
    Method("baseline"),  # trained on the full corpus
    Method("clean"),  # documents labelled toxic or hitting the blocklist dropped: the floor (REFERENCE)
    Method("filter", rival=True),  # documents hitting the blocklist dropped (C4-style)
    Method("token-filter", rival=True),  # tokens of the sentences a classifier labels toxic masked
    Method("blocklist-tokens", rival=True),  # tokens predicting a blocklisted word penalised
    Method("conditional", rival=True),  # toxic sentences learnt after a control token
    Method("dpo", comparison=True, rival=True),  # the baseline fine-tuned with DPO
    Method("rad", comparison=True, decodes="baseline", rival=True),  # reward-augmented decoding
    Method("ifguide"),  # IF-Guide, the paper's configuration (RTP queries)
    Method("ifguide+rad", comparison=True, decodes="ifguide"),
    Method("ifguide-standard"),  # IF-Guide with toxic queries only
    Method("ifguide-self"),  # IF-Guide with self-generated queries (the default)
    Method("ifguide-self+rad", comparison=True, decodes="ifguide-self"),
    Method("filter+ifguide-self"),  # IF-Guide on the blocklist-filtered corpus
    Method("influence-filter"),  # the documents the default's scores rank first, dropped (the filter's share)
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)  # the report's row order
BY_NAME = {m.name: m for m in METHODS}
COMPARISON_METHODS = tuple(m.name for m in METHODS if m.comparison)
RIVALS = tuple(m.name for m in METHODS if m.rival)
# the floor, built from the corpus labels and never offered as a method: the removed share of a method is
# (baseline - method) / (baseline - clean)
REFERENCE = "clean"
# the default, then the paper's configuration, as the report lists them
IFGUIDE_METHODS = ("ifguide-self", "ifguide")


MATCHED = "-matched"  # a masking row trained for as many usually learned tokens as the filter: METHOD-matched


def row_order(method: str) -> tuple:
    """Sort key of a report row: registered methods in their order (each followed by its matched-tokens
    twin), then the rest (sweep points) by name."""
    base = method.removesuffix(MATCHED)
    return (METHOD_NAMES.index(base) if base in BY_NAME else len(METHODS), method)


SEED = re.compile(r"-s(\d+)$")


def model_name(method: str, seed: int) -> str:
    """The model (and evaluation) name of a method's run with `seed`: METHOD-sSEED."""
    return f"{method}-s{seed}"


def method_of(name: str) -> str:
    """The method (report row) of a model or evaluation name: `ifguide-s0` -> `ifguide`; other names as they
    are."""
    return SEED.sub("", name)


def eval_name(model: str, decoding: str = "sample") -> str:
    """The evaluation (and report row) of a model under a decoding: RAD on `baseline-s0` is `rad-s0`, on
    `ifguide-s0` `ifguide+rad-s0`."""
    if decoding == "sample":
        return model
    seed = SEED.search(model)
    method = method_of(model)
    return ("rad" if method == "baseline" else f"{method}+rad") + (seed.group(0) if seed else "")


def sweep_point_name(mask: str, budget: float, objective: str, lam: float | None, floor: float | None,
                     defaults: tuple[float, str, float], unit: str = "tokens") -> tuple[str, str]:
    """(mask name, method name) of a sweep's operating point; the settings equal to `defaults` (the config's
    budget, objective and lambda), or absent (lam None: an objective lambda does not weigh), leave the demo's
    names:
    MASK[-docs][-LBUDGET][-OBJECTIVE][-lamLAMBDA][-floorFLOOR] (-docs: whole documents marked)."""
    default_budget, default_objective, default_lam = defaults
    mask = f"{mask}-docs" if unit == "documents" else mask
    mask_name = mask if budget == default_budget and unit == "tokens" else f"{mask}-L{budget:g}"
    method = mask_name + (f"-{objective}" if objective != default_objective else "")
    method += f"-lam{lam:g}" if lam is not None and lam != default_lam else ""
    return mask_name, method + (f"-floor{floor:g}" if floor is not None else "")


SWEEP_POINT = re.compile(rf"^(?P<family>.+?)(?P<point>(-L[\d.]+)?(-(?:{'|'.join(OBJECTIVES)}))?(-lam[\d.]+)?"
                         r"(-floor[\de.-]+)?"
                         rf"(?:{MATCHED})?)$")


def split_sweep_point(method: str) -> tuple[str, str]:
    """(family, operating point) of a method name built by sweep_point_name: `ifguide-self-L0.04-lam2` ->
    (`ifguide-self`, `-L0.04-lam2`); a demo method is its own family with no point."""
    match = SWEEP_POINT.match(method)
    return match.group("family"), match.group("point")


HEAD_SUFFIX = "head"  # a direction or score set that tracks the LM head: NAME-head
