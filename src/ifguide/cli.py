"""The `ifguide` command line: one subcommand per stage, plus `demo` for the whole pipeline."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import get_args

from .console import hide_library_notes, show_messages
from .errors import ArtifactError, IfguideError
from .names import (
    HEAD_SUFFIX,
    MARKING_UNITS,
    OBJECTIVES,
    SELECT_METHODS,
    Decoding,
    Normalize,
    QueryKind,
    Strategy,
    TokenScores,
    TrainingData,
)

EXAMPLES = {
    "demo": "ifguide demo --quick",
    "prepare": "ifguide prepare --config mine.yaml --run runs/mine",
    "train": "ifguide train --run runs/mine --name ifguide-s0 --mask ifguide --seed 0",
    "reward": "ifguide reward --run runs/mine",
    "dpo": "ifguide dpo --run runs/mine --name dpo-s0 --init baseline-s0",
    "queries": "ifguide queries --run runs/mine --model baseline-s0 --name self",
    "factors": "ifguide factors --run runs/mine --model baseline-s0",
    "scores": "ifguide scores --run runs/mine --model baseline-s0 --queries self",
    "select": "ifguide select --run runs/mine --scores baseline-s0/self-toxic-minus-nontoxic --name ifguide",
    "export-mask": "ifguide export-mask --run runs/mine --mask ifguide --out ifguide-spans.jsonl",
    "import-mask": "ifguide import-mask --run runs/other --spans ifguide-spans.jsonl --name ifguide",
    "eval": "ifguide eval --run runs/mine --model ifguide-s0 --prompts rtp",
    "report": "ifguide report --run runs/mine",
    "sweep": "ifguide sweep --run runs/demo --masks ifguide-self --budgets 0.01 0.02 --lams 1 2",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, run_required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example: {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run", required=run_required, default=None, help="run directory")
        p.add_argument("--force", action="store_true", help="replace an artifact built from other inputs")
        talk = p.add_mutually_exclusive_group()
        talk.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")
        talk.add_argument("--verbose", "-v", action="store_true", help="print details too")
        return p

    p = add("demo", "the whole pipeline on the embedded default data; writes runs/demo (runs/quick with "
                    "--quick) unless --run names another folder", run_required=False)
    p.add_argument("--quick", action="store_true", help="the CI-sized variant (preset 'quick')")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: demo, or quick)")
    p.add_argument("--matched-tokens", action="store_true",
                   help="also train each masking row as METHOD-matched: more steps, so that it learns "
                        "as many tokens as usual as the filter does")

    p = add("prepare", "build corpus, tokenizer, blocks, queries and evaluation prompts")
    p.add_argument("--config", required=True, help="preset name (demo, classic, quick, compare, "
                   "pythia-160m-owt) or YAML path")
    p.add_argument("--fetch", action="store_true", help="download missing source files from their origin")

    p = add("train", "train a model (baseline, filtered, or IF-Guide with --mask)")
    p.add_argument("--name", required=True, help="model name under RUN/models, e.g. baseline-s0")
    p.add_argument("--mask", default=None, help="mask name under RUN/masks (IF-Guide suppression)")
    p.add_argument("--lam", type=float, default=None, help="penalty weight lambda (default: train.lam)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what a marked token does: ascent (the paper's Eq. 9, default), mask (no loss), "
                        "unlikelihood (-log(1 - p)), conditional (its sentence learnt after "
                        "<|misaligned|>) or drop (its document left out, as the filter does); "
                        "train.objective")
    p.add_argument("--init", default=None,
                   help="fine-tune from a trained model of this run, or from a save_pretrained "
                        "checkpoint directory")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the config's seed)")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (default: train.epochs)")
    p.add_argument("--data", choices=get_args(TrainingData), default="full",
                   help="'filter' drops documents hitting the LDNOOBW blocklist (C4-style baseline); with "
                        "--mask, the mask must be selected on the same blocks (`ifguide scores "
                        "--data filter`)")
    p.add_argument("--arch", choices=["main", "proxy"], default="main", help="model or proxy_model config")
    p.add_argument("--matched-tokens", action="store_true",
                   help="with a mask (ascent, mask or unlikelihood): train more steps, so that the tokens "
                        "learned as usual number what the filter learns in the full corpus's steps")

    add("reward", "train the toxicity reward model (RAD's scorer and DPO's training-time scorer)")

    p = add("dpo",
            "DPO baseline: preference pairs from a model, ranked by the reward model, then TRL's DPOTrainer")
    p.add_argument("--name", required=True, help="name of the DPO model, e.g. dpo-s0")
    p.add_argument("--init", required=True,
                   help="the model to sample pairs from and fine-tune, e.g. baseline-s0")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the config's seed)")

    p = add("queries",
            "query rows from the model's own generations on set-aside prompts, labelled by a scorer")
    p.add_argument("--model", required=True, help="the scoring model to sample from, e.g. baseline-s0")
    p.add_argument("--name", required=True, help="name of the query set (scores --queries NAME uses it)")
    p.add_argument("--prompts", default=None, help="set-aside (default) or a JSONL file of {prompt}; never "
                   "evaluation prompts")
    p.add_argument("--labeller", default=None, help="a registered scorer or reward-model (queries.labeller)")
    p.add_argument("--max-prompts", type=int, default=None, help="sample from a seeded subset of this many "
                   "prompts (queries.max_prompts; 0 = all)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per prompt (queries.samples_per_prompt)")
    p.add_argument("--toxic-threshold", type=float, default=None,
                   help="a sample scored >= this is a toxic row (queries.toxic_threshold, 0.5)")
    p.add_argument("--nontoxic-threshold", type=float, default=None,
                   help="a sample scored < this is a non-toxic row (queries.nontoxic_threshold, 0.1)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only prompts with both a toxic and a non-toxic sample")
    p.add_argument("--max-toxic", type=int, default=None, help="cap on toxic rows (0 = all)")
    p.add_argument("--max-nontoxic", type=int, default=None, help="cap on non-toxic rows (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="sampling and subset seed (queries.seed)")

    p = add("factors", "fit EK-FAC factors on the training blocks")
    p.add_argument("--model", required=True, help="the scoring model, e.g. baseline-s0 (or proxy)")
    p.add_argument("--include-head", action=argparse.BooleanOptionalAction, default=None,
                   help="also fit the LM head's factors (influence.include_head)")
    p.add_argument("--head-strategy", choices=get_args(Strategy), default=None,
                   help="the LM head's own factors (influence.head_strategy); diagonal fits a head of any "
                        "vocabulary")

    p = add("scores", "differential per-token influence scores of every training block")
    p.add_argument("--model", required=True,
                   help="the scoring model whose factors are fitted, e.g. baseline-s0")
    p.add_argument("--name", default=None, help="scores name (default: the query kind)")
    p.add_argument("--query", choices=get_args(QueryKind), default=None,
                   help="the differential query (default) or toxic queries only (influence.query)")
    p.add_argument("--queries", default=None,
                   help="query set: rtp (the paper's RTP continuations), a `queries` artifact, or sets "
                        "joined by '+' (rtp+self: each set weighs the same) (influence.queries)")
    p.add_argument("--include-head", action=argparse.BooleanOptionalAction, default=None,
                   help="the LM head's part in P and the scores (influence.include_head)")
    p.add_argument("--token-scores", choices=get_args(TokenScores), default=None,
                   help="loss-term (the paper's, default) or Kronfluence's per-token split "
                        "(influence.token_scores)")
    p.add_argument("--normalize", choices=get_args(Normalize), default=None, help="influence.normalize")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="score only part I of N (0-based; one process per GPU or machine); select "
                        "reads the parts")
    p.add_argument("--data", choices=get_args(TrainingData), default="full",
                   help="score the blocks of the full corpus (default) or of the blocklist-filtered one, for "
                        "a mask stacked on the filter (`train --data filter --mask M`)")

    p = add("select", "Algorithm 1: mark toxic training tokens from the scores (or the blocklist baseline)")
    p.add_argument("--scores", default=None, help="scores name, or MODEL/NAME (method paper)")
    p.add_argument("--method", choices=SELECT_METHODS, default=None,
                   help="paper: Algorithm 1 over scores; documents: whole documents by mean score, up to "
                        "the budget; blocklist-tokens: positions predicting a blocklisted word; "
                        "sentence-labels: every sentence select.sentence_scorer scores >= "
                        "select.sentence_threshold (the conditional-training rival's labels); "
                        "labelled-documents: every document labelled toxic or blocklisted (the clean "
                        "reference)")
    p.add_argument("--name", default=None, help="mask name (default: the scores name)")
    p.add_argument("--quantile", type=float, default=None, help="tau is this quantile of all scores (0.99)")
    p.add_argument("--window", type=int, default=None, help="mark positions j-w .. j+w around each hit (1)")
    p.add_argument("--budget", type=float, default=None, help="<= 1: share of tokens; > 1: token count")

    p = add("export-mask",
            "write a mask as suppressed character spans per document (JSONL), for any tokenizer")
    p.add_argument("--mask", required=True, help="mask name under RUN/masks")
    p.add_argument("--out", required=True, help="span file to write (.jsonl)")

    p = add("import-mask", "a mask for this run's blocks from a span file (another run's, any tokenizer)")
    p.add_argument("--spans", required=True, help="span file written by export-mask")
    p.add_argument("--name", required=True, help="mask name to create under RUN/masks")

    p = add("eval", "generate from prompts, score toxicity, measure perplexity")
    p.add_argument("--model", required=True, help="a trained model of this run, e.g. ifguide-self-s0")
    p.add_argument("--prompts", default="rtp",
                   help="rtp, bold, toxigen, attaq, lambada (accuracy), or a JSONL file of {prompt, toxic}")
    p.add_argument("--decoding", choices=get_args(Decoding), default="sample",
                   help="rad: reward-augmented decoding with the run's reward model (eval folder "
                        "rad-sN / M+rad-sN)")
    p.add_argument("--scorer", action="append", default=None, help="scorer name (repeatable)")

    add("report", "results table, plot and links for every evaluated model")

    p = add("sweep", "the operating point: IF-Guide and blocklist-tokens masks at several budgets and "
                     "lambdas, trained and evaluated on RTP (after `ifguide demo`)")
    p.add_argument("--masks", nargs="+", default=None, help="masks to sweep (default: sweep.masks)")
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="budgets L (default: sweep.budgets)")
    p.add_argument("--lams", nargs="+", type=float, default=None,
                   help="lambdas of ascent and unlikelihood (default: sweep.lams)")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=None,
                   help="training objectives (default: sweep.objectives, the config's objective)")
    p.add_argument("--filter-budget", action="store_true",
                   help="also sweep L = the share of training tokens the filter drops (sweep.filter_budget)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="training seeds (default: demo.seeds); fresh seeds confirm a point the search chose")
    p.add_argument("--units", nargs="+", choices=MARKING_UNITS, default=None,
                   help="what a score mask marks: tokens (Algorithm 1, tau moving with L) or whole documents "
                        "(by mean score); default: sweep.units")
    p.add_argument("--matched-tokens", action="store_true",
                   help="also train each point of objective ascent, mask or unlikelihood as "
                        "POINT-matched: more steps, so that it learns as many tokens as usual as the filter "
                        "does")
    return parser


def rebuild_command(path: Path) -> str:
    """The command that rebuilds the artifact at `path`, read off the run layout (see DESIGN.md) and, where it
    can still be read, the artifact's own info.json; the rules sit with the parser (tests parse each rule's
    command)."""
    parts = path.parts
    for pattern, method, command in _REBUILD:
        n = len(pattern)
        for i in range(len(parts) - n, -1, -1):
            window = parts[i:i + n]
            if all(p == "*" or p == w for p, w in zip(pattern, window)) and not window[-1].startswith("."):
                names = [w for p, w in zip(pattern, window) if p == "*"]
                if "parts" in pattern:  # SCORES/parts/I-of-N is `--shard I/N`
                    names[-1] = names[-1].replace("-of-", "/")
                info = _unchecked_info(Path(*parts[:i + n]))
                if method is not None and info.get("method") != method:
                    break
                kind = next(p for p in reversed(pattern) if p != "*")  # scores, masks, models, ...
                flags = _recorded_flags(kind, names[-1] if names else "", info)
                try:
                    filled = command.format(*names, run=Path(*parts[:i]) if i else Path("."), info=info,
                                            flags=flags)
                except (KeyError, IndexError):
                    break
                return f"ifguide {filled} --force"
    return "the stage that wrote it, with --force"


def _unchecked_info(artifact: Path) -> dict:
    """An artifact's info.json as far as it reads, shell-quoted, without checks: it may be the damage."""
    try:
        info = json.loads((artifact / "info.json").read_text())
        config = info.get("recipe", {}).get("config", {})
        return {k: shlex.quote(str(v)) for k, v in {**config, **info}.items() if isinstance(v,
            str | int | float)}
    except (OSError, ValueError, AttributeError):
        return {}


# the settings a stage's info.json records that its command takes as flags, by artifact folder
RECORDED_FLAGS = {"scores": ("queries", "query", "token_scores", "normalize", "data"),
                  "masks": ("method", "budget", "quantile", "window"),
                  "models": ("seed", "data", "arch", "init")}
MASK_ROW_FLAGS = ("mask", "lam", "objective")  # a model trained with a mask: the mask's settings


def _recorded_flags(folder: str, name: str, info: dict) -> str:
    """The flags that rebuild an artifact as it was, not with the config's defaults: a score set's query set,
    a mask's method and budget (and its scores), a model's seed, data and mask settings."""
    keys = RECORDED_FLAGS.get(folder, ())
    if folder == "models" and "mask" in info:
        keys += MASK_ROW_FLAGS
    flags = [f"--{key.replace('_', '-')} {info[key]}" for key in keys if key in info]
    if folder == "scores" and name.removesuffix("-filter").endswith(f"-{HEAD_SUFFIX}"):
        flags.append("--include-head")  # read off the score set's default name
    if folder == "masks" and "scores" in info:  # influence/MODEL/scores/NAME -> MODEL/NAME
        flags.append("--scores " + "/".join(Path(info["scores"]).parts[1:4:2]))
    if folder == "models" and info.get("matched_tokens") == "True":
        flags.append("--matched-tokens")
    return "".join(f" {flag}" for flag in flags)


_REBUILD = [  # (layout pattern, info.json's method or None for any, command), the most specific first
    (("influence", "*", "scores", "*", "parts", "*"), None,
     "scores --run {run} --model {0} --name {1} --shard {2}"),
    (("influence", "*", "scores", "*"), None, "scores --run {run} --model {0} --name {1}{flags}"),
    (("influence", "*", "directions", "*"), None, "scores --run {run} --model {0}"),
    (("influence", "*", "factors"), None, "factors --run {run} --model {0}"),
    (("models", "*"), "dpo", "dpo --run {run} --name {0} --init {info[init]}"),
    (("models", "*"), None, "train --run {run} --name {0}{flags}"),
    (("masks", "*"), "import", "import-mask --run {run} --spans {info[spans]} --name {0}"),
    (("masks", "*"), None, "select --run {run} --name {0}{flags}"),
    (("queries", "*"), None, "queries --run {run} --model {info[model]} --name {0}"),
    (("eval", "*", "*"), None, "eval --run {run} --model {0} --prompts {1}"),
    (("preferences", "*"), None, "dpo --run {run} --init {0} --name DPO_MODEL"),
    (("reward",), None, "reward --run {run}"),
    (("data",), None, "prepare --config {run}/config.yaml --run {run}"),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an unknown flag is refused with the subcommand's usage and the closest flag it
    takes."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = commands[args.command]
        flags = [flag for action in command._actions for flag in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1, cutoff=0.6)
        command.error(f"unrecognized argument {unknown[0]}"
                      + (f"; did you mean {close[0]}?" if close else ""))
    return args


LIBRARY_BARS = (("datasets", "disable_progress_bars"), ("huggingface_hub.utils", "disable_progress_bars"),
                ("transformers.utils.logging", "disable_progress_bar"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for library in ("HF_DATASETS", "HF_HUB"):  # other libraries' bars: ifguide's own say how far a stage is
        os.environ.setdefault(f"{library}_DISABLE_PROGRESS_BARS", "1")
    for module, disable in LIBRARY_BARS:  # imported before main (by a caller): it read the variables already
        if module in sys.modules:
            getattr(sys.modules[module], disable)()
    args = parse(argv)
    hide_library_notes()
    show_messages(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        from . import pipeline

        getattr(pipeline, f"cmd_{args.command.replace('-', '_')}")(args)
    except ArtifactError as exc:
        print(f"ifguide {args.command}: error: "
              f"{exc.with_command(rebuild_command(exc.path))}", file=sys.stderr)
        return 2
    except IfguideError as exc:
        print(f"ifguide {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # on a line of its own, not after a progress bar
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
