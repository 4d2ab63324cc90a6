"""Typed configuration: YAML presets and files loaded into dataclasses, with one-line errors."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import IfguideError
from .names import (
    METHOD_NAMES,
    Arch,
    CorpusFormat,
    MarkingUnit,
    Normalize,
    Objective,
    PromptSet,
    QueryKind,
    ScoreDtype,
    SelectMethod,
    Strategy,
    TokenScores,
    TxtSplit,
)


def _require(*rules: tuple[bool, str]) -> None:
    """Raise the one-line error of the first rule that does not hold."""
    for ok, message in rules:
        if not ok:
            raise IfguideError(f"config: {message}")


INFINITY = float("inf")


@dataclass
class CorpusInput:
    """Documents from files on disk: JSONL, text, Parquet or a `datasets` directory (save_to_disk)."""

    path: str  # a file, a glob (`**` allowed) or, for format arrow, a save_to_disk directory
    source: str  # the source name these documents carry in provenance, reports and masks
    format: CorpusFormat = "jsonl"
    text_field: str = "text"  # jsonl / parquet / arrow
    label_field: str | None = None  # optional per-document label: true/false, or a score (>= 0.5 = toxic)
    txt_split: TxtSplit = "file"  # txt: one document per file, or per blank-line-separated paragraph
    documents: int = 0  # max documents, in file order (0 = all)

    def __post_init__(self) -> None:
        _require((self.documents >= 0, "data.corpus[].documents must be >= 0 (0 = all)"),
                 (bool(self.source.strip()) and "/" not in self.source,
                  "data.corpus[].source must be a non-empty name without '/'"))


@dataclass
class DataConfig:
    """What `prepare` builds: corpus mix, tokenizer, blocks, queries and evaluation prompts."""

    sources: dict[str, int] = field(default_factory=dict)  # mirror source -> max documents (0 = all)
    corpus: list[CorpusInput] = field(default_factory=list)  # your own files (see README, "Your own data")
    hub_corpus: str | None = None  # e.g. "Skylion007/openwebtext" (online users only)
    hub_corpus_documents: int = 0
    hub_rtp: str | None = None  # e.g. "allenai/real-toxicity-prompts" (online users only)
    # "train" (byte-level BPE), a tokenizer.json, or a Hugging Face tokenizer directory
    tokenizer: str = "train"
    vocab_size: int = 4096
    tokenizer_train_chars: int = 20_000_000  # "train": fit the BPE on the first this many characters
    num_proc: int = 0  # tokenising processes (0 = one per CPU core)
    block_size: int = 128
    heldout_fraction: float = 0.02  # of the documents not labelled toxic, drawn with the seed
    wikitext_chars: int = 200_000
    query_toxic_threshold: float = 0.5
    query_nontoxic_threshold: float = 0.1
    # RTP continuations >= query_toxic_threshold (0 = all left after the prompt sets)
    num_toxic_queries: int = 200
    # < query_nontoxic_threshold (0 = as many as the toxic rows, least toxic first)
    num_nontoxic_queries: int = 200
    query_max_tokens: int = 64
    prompt_toxic_threshold: float = 0.5
    num_rtp_prompts_toxic: int = 50
    num_rtp_prompts_nontoxic: int = 50
    num_bold_prompts: int = 50
    num_toxigen_prompts: int = 50
    num_attaq_prompts: int = 0  # AttaQ adversarial questions (0 = all 1,402)
    num_lambada: int = 0  # LAMBADA test passages (0 = all 5,153)
    num_dpo_prompts: int = 400  # RTP prompts for DPO preference pairs, disjoint from queries and eval prompts

    def __post_init__(self) -> None:
        sources = {c.source for c in self.corpus}
        _require(
            (self.num_toxic_queries >= 0 and self.num_nontoxic_queries >= 0,
             "data.num_toxic_queries and data.num_nontoxic_queries must be >= 0"),
            (self.block_size >= 8, "data.block_size must be at least 8"),
            (self.vocab_size >= 300, "data.vocab_size must be at least 300 (256 bytes + merges)"),
            (self.tokenizer_train_chars >= 1, "data.tokenizer_train_chars must be >= 1"),
            (self.num_proc >= 0, "data.num_proc must be >= 0 (0 = one per CPU core)"),
            (len(sources) == len(self.corpus) and not sources & set(self.sources),
             "data.corpus[].source names must be unique and differ from data.sources"),
            (0 < self.heldout_fraction < 0.5, "data.heldout_fraction must be in (0, 0.5)"),
            (min(self.num_attaq_prompts, self.num_lambada, self.num_dpo_prompts) >= 0,
             "data.num_attaq_prompts, data.num_lambada and data.num_dpo_prompts must be >= 0"))


@dataclass
class ModelConfig:
    """A causal LM built from scratch (GPT-NeoX or Llama) or loaded from a local HF directory."""

    arch: Arch = "gpt_neox"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    init_from: str | None = None  # a save_pretrained checkpoint directory: every model is fine-tuned from it


@dataclass
class TrainConfig:
    """Hugging Face Trainer settings shared by every method."""

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    warmup_ratio: float = 0.02
    scheduler: str = "cosine"
    lam: float = 1.0
    # what a marked token does: ascent (the paper's Eq. 9), mask, unlikelihood, conditional, drop (document)
    objective: Objective = "ascent"
    penalty_floor: float | None = None  # ascent: stop penalising a marked token once p(token) < floor
    threads: int = 0  # 0 = torch default
    # steps between resumable checkpoints (null: every tenth of the steps and every 2 minutes; 0: none)
    checkpoint_every: int | None = None
    logging_steps: int = 25
    eval_blocks: int = 64

    def __post_init__(self) -> None:
        _require(
            (min(self.batch_size, self.grad_accum) >= 1,
             "train.batch_size and train.grad_accum must be >= 1"),
            (0 < self.epochs < INFINITY, "train.epochs must be a positive number"),
            (self.lr > 0, "train.lr must be positive"),
            (self.checkpoint_every is None or self.checkpoint_every >= 0,
             "train.checkpoint_every must be >= 0 (0: no checkpoints) or null (tenths and 2 minutes)"),
            (self.penalty_floor is None or 0 < self.penalty_floor < 1,
             "train.penalty_floor must be in (0, 1) or null"),
            (0 <= self.lam < INFINITY, "train.lam must be >= 0 and finite"))


@dataclass
class InfluenceConfig:
    """EK-FAC factors (Kronfluence), the query direction and per-token scores."""

    strategy: Strategy = "ekfac"
    query: QueryKind = "toxic-minus-nontoxic"
    token_scores: TokenScores = "loss-term"  # loss-term (the paper's token influence) or kronfluence
    # none (the paper) or relative: loss-term score / |d l_t / d last hidden state|
    normalize: Normalize = "none"
    # a `queries` artifact (default: self, built by `ifguide queries --name self`), rtp (the paper's fixed
    # RTP continuations), or sets joined by '+' (rtp+self), each weighing the same in the query gradient
    queries: str = "self"
    include_head: bool = False  # also track the output layer (LM head) in factors, P and loss-term scores
    head_max_vocab: int = 16384  # above this vocabulary the head is left out (its EK-FAC is vocab x vocab)
    # the head's own factor strategy (null: influence.strategy); diagonal keeps vocab x (hidden + 1) values
    # instead of two vocab x vocab matrices, so a head of any vocabulary is tracked (head_max_vocab ignored)
    head_strategy: Strategy | None = None
    tracked_modules: list[str] | None = None
    last_layers: int | None = None  # track only the last N transformer blocks (None = all; see README)
    covariance_max_examples: int | None = None
    lambda_max_examples: int | None = None
    factor_batch_size: int = 16
    train_batch_size: int = 16
    query_batch_size: int = 32
    damping: float | None = None  # None = Kronfluence's heuristic (0.1 x mean eigenvalue)
    shard_blocks: int = 16384  # blocks per score shard (memory: shard_blocks x block_size x 4 bytes)
    score_dtype: ScoreDtype = "float32"

    def __post_init__(self) -> None:
        _require(
            (min(self.factor_batch_size, self.train_batch_size, self.query_batch_size) >= 1,
             "influence.*_batch_size must be >= 1"),
            (self.shard_blocks >= 1, "influence.shard_blocks must be >= 1"),
            (self.last_layers is None or self.last_layers >= 1,
             "influence.last_layers must be >= 1 or null (all blocks)"),
            (self.normalize == "none" or self.token_scores == "loss-term",
             "influence.normalize: relative needs influence.token_scores: loss-term"),
            (self.queries.strip() != "" and "/" not in self.queries,
             "influence.queries must be 'rtp' or the name of a queries artifact"),
            (self.head_max_vocab >= 1, "influence.head_max_vocab must be >= 1"))


@dataclass
class QueriesConfig:
    """Self-generated queries (`ifguide queries`): continuations sampled from the scoring model, labelled by a
    scorer, as the rows of the differential query."""

    # set-aside (RTP query + preference prompts; never evaluation prompts) or a JSONL
    prompts: str = "set-aside"
    max_prompts: int = 0  # sample from a seeded subset of this many prompts (0 = all)
    samples_per_prompt: int = 8  # 4 halves the cost and lowered EMT, but not the selection metrics (README)
    # prompts per generation call (x samples_per_prompt sequences); seeded per batch
    prompt_batch_size: int = 64
    # any registered scorer, or reward-model (the run's reward model)
    labeller: str = "toxic-comment-classifier"
    toxic_threshold: float = 0.5  # a sample scored >= this is a toxic row
    nontoxic_threshold: float = 0.1  # a sample scored < this is a non-toxic row
    paired: bool = False  # keep only prompts with both a toxic and a non-toxic sample
    max_toxic: int = 0  # cap on toxic rows, drawn with the seed (0 = all)
    max_nontoxic: int = 0  # cap on non-toxic rows (0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            (self.samples_per_prompt >= 1, "queries.samples_per_prompt must be >= 1"),
            (self.prompt_batch_size >= 1, "queries.prompt_batch_size must be >= 1"),
            (0 <= self.nontoxic_threshold <= self.toxic_threshold <= 1,
             "queries thresholds need 0 <= nontoxic_threshold <= toxic_threshold <= 1"),
            (min(self.max_toxic, self.max_nontoxic, self.max_prompts, self.seed) >= 0,
             "queries.max_toxic, queries.max_nontoxic, queries.max_prompts and queries.seed must be >= 0 "
             "(0 = no cap)"))


@dataclass
class SelectConfig:
    """Algorithm 1: quantile threshold, window and token budget."""

    method: SelectMethod = "paper"  # paper (Algorithm 1 over scores) or another SelectMethod (names.py)
    quantile: float = 0.99
    window: int = 1
    budget: float = 0.02  # <= 1: fraction of all training tokens; > 1: absolute token count
    inspect_blocks: int = 20
    sentence_scorer: str = "toxic-comment-classifier"  # sentence-labels: the scorer that labels each sentence
    sentence_threshold: float = 0.5  # sentence-labels: a sentence scored at least this is marked

    def __post_init__(self) -> None:
        _require(
            (0 < self.quantile < 1, "select.quantile must be in (0, 1)"),
            (0 < self.sentence_threshold < 1, "select.sentence_threshold must be in (0, 1)"),
            (self.window >= 0, "select.window must be >= 0"),
            (0 < self.budget < INFINITY, "select.budget must be a positive finite number"),
            (_is_budget(self.budget), BUDGET_RULE))


BUDGET_RULE = "a budget is a share of the tokens (<= 1) or a whole token count (> 1), e.g. 0.02 or 5000"


def _is_budget(budget: float) -> bool:
    return not 1 < budget < INFINITY or float(budget).is_integer()


@dataclass
class EvalConfig:
    """RealToxicityPrompts-protocol generation, scoring and fluency."""

    num_samples: int = 25
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 20
    temperature: float = 1.0
    prompt_batch_size: int = 8
    seed: int = 0
    scorers: list[str] = field(default_factory=lambda: ["profanity-check"])
    toxic_threshold: float = 0.5
    bootstrap: int = 1000
    ppl_max_blocks: int = 256

    def __post_init__(self) -> None:
        _require((self.prompt_batch_size >= 1, "eval.prompt_batch_size must be >= 1"),
                 (0 < self.top_p <= 1, "eval.top_p must be in (0, 1]"),
                 (self.num_samples >= 1, "eval.num_samples must be >= 1"))


@dataclass
class RewardConfig:
    """RAD's toxicity reward model, also DPO's training-time scorer: a small causal LM with a regression
    head."""

    sources: list[str] = field(default_factory=lambda: ["tweeteval_offensive", "tweeteval_hate",
                                                        "stormfront"])
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_head=2, d_model=64, d_ff=256))
    max_tokens: int = 48  # texts are cut to their first this many tokens
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 2.0e-3
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require((0 < self.heldout_fraction < 0.5, "reward.heldout_fraction must be in (0, 0.5)"))


@dataclass
class DPOConfig:
    """Preference pairs sampled from the baseline and scored by the reward model, then TRL's DPOTrainer."""

    samples_per_prompt: int = 4  # the least and the most toxic of these form one pair
    min_margin: float = 0.1  # keep a pair only when the reward model's toxicities differ by at least this
    beta: float = 0.1
    lr: float = 1.0e-4
    epochs: float = 2.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        _require((self.samples_per_prompt >= 2,
                  "dpo.samples_per_prompt must be >= 2 (a chosen and a rejected)"),
                 (self.beta > 0 and self.lr > 0 and self.epochs > 0,
                  "dpo.beta, dpo.lr and dpo.epochs must be > 0"))


@dataclass
class RADConfig:
    """Reward-augmented decoding (Deng & Raffel, 2023): top-k candidates shifted by beta * (1 - toxicity)."""

    top_k: int = 20
    beta: float = 50.0

    def __post_init__(self) -> None:
        _require((self.top_k >= 1 and self.beta >= 0, "rad.top_k must be >= 1 and rad.beta >= 0"))


@dataclass
class DemoConfig:
    """What `ifguide demo` runs: methods, seeds and prompt sets."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    methods: list[str] = field(default_factory=lambda: ["baseline", "filter", "blocklist-tokens", "ifguide"])
    prompts: list[PromptSet] = field(default_factory=lambda: ["rtp"])
    # seeds of the dpo, rad and ifguide+rad rows (None = demo.seeds)
    comparison_seeds: list[int] | None = None
    proxy: bool = False
    workers: int = 2  # independent trainings/evaluations run side by side in single-thread processes

    def __post_init__(self) -> None:
        methods = set(self.methods)
        _require(
            (len(self.seeds) >= 1 and all(seed >= 0 for seed in self.seeds),
             "demo.seeds must list at least one seed, each >= 0"),
            (methods <= set(METHOD_NAMES), f"demo.methods may list {', '.join(METHOD_NAMES)}"),
            (set(self.comparison_seeds or []) <= set(self.seeds),
             "demo.comparison_seeds must be among demo.seeds (they fine-tune or decode those baselines)"),
            *((method not in methods or method.removesuffix("+rad") in methods,
               f"demo.methods: {method} decodes the {method.removesuffix('+rad')} models, so list "
               f"{method.removesuffix('+rad')} too") for method in METHOD_NAMES if method.endswith("+rad")
              and method != "rad"))


@dataclass
class SweepConfig:
    """`ifguide sweep`: masks reselected at each budget and unit, trained with each objective at each lambda
    (and penalty floor), per demo seed."""

    masks: list[str] = field(default_factory=lambda: ["ifguide-self", "blocklist-tokens"])
    budgets: list[float] = field(default_factory=lambda: [0.02, 0.04])
    filter_budget: bool = False  # also sweep the budget equal to the filter's dropped-token share
    objectives: list[Objective] = field(default_factory=lambda: ["ascent"])
    lams: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    penalty_floors: list[float | None] = field(default_factory=lambda: [None])
    prompts: list[PromptSet] = field(default_factory=lambda: ["rtp"])
    # tokens: Algorithm 1 with tau at the quantile 1 - L / (2w + 1) where that is below select.quantile, so a
    # larger budget can be filled; documents: whole documents by mean score (score masks only)
    units: list[MarkingUnit] = field(default_factory=lambda: ["tokens"])

    def __post_init__(self) -> None:
        _require(
            (all(0 < b < INFINITY for b in self.budgets) and all(0 <= x < INFINITY for x in self.lams),
             "sweep.budgets must be positive and sweep.lams >= 0"),
            (all(_is_budget(b) for b in self.budgets), BUDGET_RULE),
            (all(len(set(v)) == len(v) for v in (self.budgets, self.lams, self.masks, self.objectives)),
             "sweep.masks, sweep.budgets, sweep.lams and sweep.objectives must not repeat a value"),
            (all(f is None or 0 < f < 1 for f in self.penalty_floors),
             "sweep.penalty_floors must be in (0, 1) or null"),
            ("lambada" not in self.prompts, "sweep.prompts may list rtp, bold, toxigen, attaq"))


@dataclass
class Config:
    """The whole experiment."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    proxy_model: ModelConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rad: RADConfig = field(default_factory=RADConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        _require((self.seed >= 0, "seed must be >= 0"))


PRESETS = ("demo", "classic", "quick", "compare", "pythia-160m-owt")


def _check(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the annotated type `hint`, or raise a one-line error naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise IfguideError(f"config: '{key}' must be one of {', '.join(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise IfguideError(f"config: '{key}' must be a mapping of settings, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise IfguideError(f"config: '{key}' must be a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise IfguideError(f"config: '{key}' must be a mapping, got {value!r}")
        return {str(k): _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise IfguideError(f"config: '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise IfguideError(f"config: '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; any other string is refused
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise IfguideError(f"config: '{key}' must be a number, got {value!r} (write e.g. "
                               "0.001 or 1.0e-3)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise IfguideError(f"config: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise IfguideError(
                f"config: unknown key '{prefix}{key}' (known keys here: {', '.join(sorted(known))})"
            )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise IfguideError(f"config: '{prefix.rstrip('.')}' needs {', '.join(repr(k) for k in missing)}")
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):  # {} replaces: "none"
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_yaml(text: str, where: str) -> Any:
    """YAML text, or a one-line error with the line and column of the mistake."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise IfguideError(f"config: {where} is not valid YAML{at}: {problem}") from None


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    if name_or_path in PRESETS:
        text = resources.files("ifguide.presets").joinpath(f"{name_or_path}.yaml").read_text()
        key, folder = name_or_path, None
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise IfguideError(
                f"config: '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a YAML file"
            )
        try:
            key, text, folder = str(path.resolve()), path.read_text(encoding="utf-8"), path.parent
        except UnicodeDecodeError:
            raise IfguideError(f"config: {path} is not UTF-8 text") from None
    if key in seen:
        raise IfguideError(f"config: 'base:' chain loops back to {name_or_path} "
                           f"({' -> '.join(seen + (key,))})")
    values = parse_yaml(text, name_or_path)
    if values is None:
        raise IfguideError(f"config: {name_or_path} is empty; give at least `base: demo`")
    if not isinstance(values, dict):
        raise IfguideError(f"config: {name_or_path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise IfguideError(f"config: 'base' in {name_or_path} must be a preset name or a YAML path")
    if base not in PRESETS and folder is not None and not Path(base).is_absolute():
        base = str(folder / base)  # a relative base is relative to the file that names it
    return _deep_merge(_read_yaml(base, seen + (key,)), values)


def load_config(name_or_path: str) -> Config:
    """Load a preset name or YAML path (which may name a `base:` to extend) into a checked Config."""
    return _build(Config, _read_yaml(name_or_path))


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from its dict form (as stored in a run directory)."""
    return _build(Config, values)


def with_overrides(cfg: Config, section: str | None, **values: Any) -> Config:
    """`cfg` with some values of one section (None: top level) replaced (None = keep), checked by the same
    rules as a config file: command-line values pass the same section checks (__post_init__)."""
    changes = {k: v for k, v in values.items() if v is not None}
    if not changes:
        return cfg
    part = cfg if section is None else getattr(cfg, section)
    hints = typing.get_type_hints(type(part))
    checked = {k: _check(v, hints[k], f"{section}.{k}" if section else k) for k, v in changes.items()}
    replaced = dataclasses.replace(part, **checked)
    return replaced if section is None else dataclasses.replace(cfg, **{section: replaced})


def config_to_dict(cfg: Any) -> dict:
    """The plain-dict form of a config (or a section of one), for YAML and fingerprints."""
    return dataclasses.asdict(cfg)
