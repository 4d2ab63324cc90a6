"""CLI commands: each maps arguments onto one stage; `demo` chains them all on the embedded default."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .artifacts import Run, refuse_if_building, write_json
from .config import Config, SelectConfig, load_config, with_overrides
from .console import hide_library_notes, show_messages
from .data import load_prompts
from .errors import IfguideError
from .names import (
    COMPARISON_METHODS,
    LAMBDA_OBJECTIVES,
    MASKING_OBJECTIVES,
    MATCHED,
    METHODS,
    SCORED_METHODS,
    model_name,
    sweep_point_name,
)
from .toxicity import check_scorer

log = logging.getLogger(__name__)

# Each command checks its arguments and the run's config first and imports the heavy stage modules (torch,
# transformers, kronfluence) only after, so a mistake is reported at once.


def cmd_prepare(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = load_config(args.config)
    run.check_config(cfg, force=args.force)
    from .data import check_tokenizer_spec, matched_files

    check_tokenizer_spec(cfg.data.tokenizer)
    for spec in cfg.data.corpus:
        matched_files(spec)
    from .data import prepare

    prepare(cfg, run, force=args.force, fetch=args.fetch)
    run.save_config(cfg)  # only once the data it describes exists


def cmd_train(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(with_overrides(run.load_config(), "train", lam=args.lam, epochs=args.epochs,
                                        objective=args.objective), None,
                         seed=args.seed)
    refuse_if_building(run.model(args.name))
    from .training import check_training

    # before torch loads: a mistake is one line at once
    check_training(cfg, run, args.mask, args.init, args.arch, args.lam, args.objective, args.matched_tokens)
    from .training import train

    train(cfg, run, args.name, seed=args.seed, mask=args.mask, init=args.init, data=args.data, arch=args.arch,
          lam=args.lam, objective=args.objective, matched_tokens=args.matched_tokens, force=args.force)


def cmd_reward(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    from .toxicity import train_reward_model

    train_reward_model(cfg, run, force=args.force)


def cmd_dpo(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    refuse_if_building(run.model(args.name))
    run.checkpoint(args.init)
    from .baselines import train_dpo

    train_dpo(cfg, run, args.name, args.init, seed=args.seed, force=args.force)


def cmd_queries(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(run.load_config(), "queries", prompts=args.prompts, labeller=args.labeller,
                         max_prompts=args.max_prompts, samples_per_prompt=args.samples,
                         toxic_threshold=args.toxic_threshold, nontoxic_threshold=args.nontoxic_threshold,
                         paired=args.paired, max_toxic=args.max_toxic, max_nontoxic=args.max_nontoxic,
                         seed=args.seed)
    refuse_if_building(run.queries(args.name))
    check_labeller(cfg, run)
    run.checkpoint(args.model, "--model")
    from .queries import SET_ASIDE, build_queries, query_prompts

    # a prompt file, or an evaluation set refused, before torch is imported
    if cfg.queries.prompts != SET_ASIDE:
        query_prompts(run, cfg.queries.prompts)

    build_queries(cfg, run, args.model, args.name, force=args.force)


def require_model(run: Run, name: str) -> None:
    """A trained, current model of the run, or a one-line error before any heavy import."""
    run.require(run.model(name), f"run `ifguide train --name {name}` first")


def check_labeller(cfg: Config, run: Run) -> None:
    """A labeller that is unknown or cannot load is a one-line error before any heavy import."""
    from .queries import REWARD_LABELLER
    from .toxicity import SCORERS, check_scorer

    name = cfg.queries.labeller
    if name == REWARD_LABELLER:
        run.require(run.reward(), "run `ifguide reward` first, or pick another --labeller")
    elif name not in SCORERS and not name.startswith("hf:"):
        raise IfguideError(f"queries.labeller '{name}' is unknown (use {REWARD_LABELLER}, "
                           f"{', '.join(SCORERS)} or hf:PATH)")
    else:
        check_scorer(name)


def cmd_factors(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(run.load_config(), "influence", include_head=args.include_head,
                         head_strategy=args.head_strategy)
    require_model(run, args.model)
    refuse_if_building(run.factors(args.model))
    from .influence import factors

    factors(cfg, run, args.model, force=args.force)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`--shard I/N` as (I, N), or a one-line error."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise IfguideError(f"--shard {text!r} must be I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise IfguideError(f"--shard {text}: I must be in 0..N-1 (parts are numbered from 0)")
    return i, n


def cmd_scores(args: argparse.Namespace) -> None:
    run = Run(args.run)
    part = parse_part(args.shard)
    cfg = with_overrides(run.load_config(), "influence", token_scores=args.token_scores,
                         normalize=args.normalize,
                         queries=args.queries, include_head=args.include_head)
    run.scores(args.model, args.name or args.query or cfg.influence.query)
    require_model(run, args.model)
    from .queries import query_artifacts

    for path in query_artifacts(run, cfg.influence.queries):
        run.require(path, f"run `ifguide queries --name {path.name}` first")
    from .influence import scores

    scores(cfg, run, args.model, name=args.name, query=args.query, part=part, data=args.data,
           force=args.force)


def cmd_select(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(run.load_config(), "select", quantile=args.quantile, window=args.window,
                         budget=args.budget,
                         method=args.method)
    if args.name is not None:
        run.mask(args.name)
    if cfg.select.method == "sentence-labels":
        check_scorer(cfg.select.sentence_scorer)
    scores = args.scores
    if cfg.select.method in SCORED_METHODS:  # a wrong name is one line before the heavy imports
        from .selection import find_scores

        found = find_scores(run, scores)
        scores = f"{found.parent.parent.name}/{found.name}"
    from .selection import select

    select(cfg, run, scores, name=args.name, force=args.force)


def cmd_export_mask(args: argparse.Namespace) -> None:
    run = Run(args.run)
    run.require(run.mask(args.mask), f"run `ifguide select --name {args.mask}` first")
    run.check_output(Path(args.out), "--out")
    from .selection import export_mask

    export_mask(run, args.mask, Path(args.out), force=args.force)


def cmd_import_mask(args: argparse.Namespace) -> None:
    run = Run(args.run)
    run.mask(args.name)
    if not Path(args.spans).is_file():
        raise IfguideError(f"--spans {args.spans} is not a file; write one with `ifguide export-mask`")
    from .selection import import_mask

    import_mask(run, Path(args.spans), args.name, force=args.force)


def cmd_eval(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    require_model(run, args.model)
    for name in args.scorer or []:
        check_scorer(name)
    if args.prompts == "lambada" and args.decoding != "sample":
        raise IfguideError("LAMBADA accuracy is a property of the model, not of RAD's decoding; "
                           "drop --decoding")
    if args.prompts != "lambada":
        # a missing or malformed prompt file fails here, before torch is imported
        load_prompts(run, args.prompts)
    from .evaluation import evaluate

    evaluate(cfg, run, args.model, prompts=args.prompts, scorers=args.scorer, decoding=args.decoding,
             force=args.force)


def show_report(run: Run, timings: dict | None = None) -> None:
    """Write the report; show its headline (the full tables with --verbose)."""
    from .evaluation import headline, report

    log.debug(report(run, timings=timings))
    log.info(headline(run))


def cmd_report(args: argparse.Namespace) -> None:
    show_report(Run(args.run))


def _single_thread(slots, level: int) -> None:
    """A demo worker: one thread, its own line for progress bars, and the messages the parent shows."""
    import os

    import torch

    from .training import BAR_POSITION

    show_messages(level)
    hide_library_notes()
    torch.set_num_threads(1)
    with slots.get_lock():
        os.environ[BAR_POSITION] = str(slots.value)
        slots.value += 1


def run_jobs(jobs: list[tuple[Callable, tuple, dict]], workers: int) -> None:
    """Run independent stage calls, side by side in single-thread processes when `workers` > 1.

    On small CPU models, two single-thread jobs give more total throughput than one two-thread job.
    """
    if workers <= 1 or len(jobs) <= 1:
        for fn, args, kwargs in jobs:
            fn(*args, **kwargs)
        return
    context = multiprocessing.get_context("spawn")
    slots = context.Value("i", 0)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread,
                             initargs=(slots, logging.getLogger("ifguide").getEffectiveLevel())) as pool:
        for future in [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in jobs]:
            future.result()


# IF-Guide rows: mask name -> (query set, query kind, LM head tracked, training data). `ifguide` is the
# paper's configuration (fixed RTP queries, no head), `ifguide-self` the default (queries sampled from the
# scoring model, see queries/stage.py; the head as influence.include_head says), `filter+ifguide-self` the
# default stacked on the filter (its mask selected on the filtered corpus's blocks). Factors fitted with the
# head serve all.
IFGUIDE_ROWS = {"ifguide": ("rtp", "toxic-minus-nontoxic", False, "full"),
                "ifguide-standard": ("rtp", "toxic", False, "full"),
                "ifguide-self": ("self", "toxic-minus-nontoxic", None, "full"),
                "filter+ifguide-self": ("self", "toxic-minus-nontoxic", None, "filter")}
# Rows trained by `train`, with their arguments: the mask rows use the mask of their name.
TRAINED_ROWS = {"filter": {"data": "filter"}, "blocklist-tokens": {"mask": "blocklist-tokens"},
                "conditional": {"mask": "conditional", "objective": "conditional"},
                "token-filter": {"mask": "conditional", "objective": "mask"},
                "clean": {"mask": "clean", "objective": "drop"},
                "influence-filter": {"mask": "influence-filter", "objective": "drop"}} | {
                    method: {"mask": method, "data": data} for method, (*_, data) in IFGUIDE_ROWS.items()}


def masking_row(cfg: Config, method: str) -> bool:
    """A trained row that marks tokens and still trains on every block (ascent, mask, unlikelihood), so that
    it can be trained at the filter's learned tokens."""
    row = TRAINED_ROWS.get(method, {})
    return "mask" in row and row.get("objective", cfg.train.objective) in MASKING_OBJECTIVES


# masks selected without scores -> their select method
LABELLED_MASKS = {"blocklist-tokens": "blocklist-tokens", "conditional": "sentence-labels",
                  "clean": "labelled-documents"}


def filter_share(run: Run) -> float:
    """The share of the training tokens the blocklist filter drops, to four digits."""
    return round(run.require(run.data(), "run `ifguide prepare` first")["summary"]["blocklisted_token_share"],
                 4)


def cmd_demo(args: argparse.Namespace) -> None:
    """prepare -> baseline -> factors -> [queries] -> scores -> select -> ifguide and comparison models ->
    eval -> report."""
    from .baselines import train_dpo
    from .data import prepare
    from .evaluation import DEMO_MARKER, evaluate
    from .influence import factors, scores, scores_name
    from .queries import REWARD_LABELLER, build_queries
    from .selection import select
    from .toxicity import train_reward_model
    from .training import train

    preset = args.config or ("quick" if args.quick else "demo")
    run = Run(args.run or f"runs/{'quick' if args.quick else 'demo'}")
    cfg = load_config(preset)
    run.check_config(cfg, force=args.force)
    check_labeller(cfg, run)
    if "conditional" in cfg.demo.methods:
        check_scorer(cfg.select.sentence_scorer)
    timings: dict[str, float] = {}
    force, workers = args.force, cfg.demo.workers

    def timed(stage: str, fn: Callable, *a, **kw) -> None:
        start = time.perf_counter()
        fn(*a, **kw)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    timed("prepare", prepare, cfg, run, force=force)
    run.save_config(cfg)
    write_json(run.root / DEMO_MARKER, {"preset": preset})
    seeds, methods = cfg.demo.seeds, cfg.demo.methods
    scorer_model = "proxy" if cfg.demo.proxy else model_name("baseline", seeds[0])
    self_queries = any(IFGUIDE_ROWS[m][0] == "self" for m in methods if m in IFGUIDE_ROWS)
    jobs = [(train, (cfg, run, model_name("baseline", seed)), {"seed": seed, "force": force})
            for seed in seeds]
    if cfg.demo.proxy:
        jobs.append((train, (cfg, run, "proxy"), {"seed": seeds[0], "arch": "proxy", "force": force}))
    reward_needed = set(COMPARISON_METHODS) & set(methods) or (self_queries
                                                               and cfg.queries.labeller == REWARD_LABELLER)
    if reward_needed:
        jobs.insert(0, (train_reward_model, (cfg, run), {"force": force}))  # the longest job first
    timed("train baseline and reward model", run_jobs, jobs, workers)
    timed("factors", factors, cfg, run, scorer_model, force=force)
    if self_queries:
        timed("queries", build_queries, cfg, run, scorer_model, "self", force=force)

    def row_scores(method: str) -> str:
        """Scores for an IF-Guide row's queries, head and data; returns the score set's MODEL/NAME."""
        queries, kind, head, data = IFGUIDE_ROWS[method]
        head = cfg.influence.include_head if head is None else head
        timed("scores", scores, cfg, run, scorer_model, query=kind, queries=queries, include_head=head,
              data=data, force=force)
        return f"{scorer_model}/{scores_name(queries, kind, head, data)}"

    for method in IFGUIDE_ROWS:
        if method in methods:
            timed("select", select, cfg, run, row_scores(method), name=method, method="paper", force=force)
    if "influence-filter" in methods:  # the default's scores, whole documents at the filter's token share
        timed("select", select, cfg, run, row_scores("ifguide-self"), name="influence-filter",
              method="documents", budget=filter_share(run), force=force)
    for mask, kind in LABELLED_MASKS.items():
        if any(TRAINED_ROWS[m].get("mask") == mask for m in methods if m in TRAINED_ROWS):
            timed("select", select, cfg, run, None, name=mask, method=kind, force=force)
    # --matched-tokens: each masking row also as METHOD-matched, trained until it learned the filter's tokens
    matched = [m for m in methods if args.matched_tokens and masking_row(cfg, m)]
    jobs = [(train, (cfg, run, model_name(method, seed)), {"seed": seed, "force": force,
                                                           **TRAINED_ROWS[method]})
            for method in methods if method in TRAINED_ROWS for seed in seeds]
    jobs += [(train, (cfg, run, model_name(method + MATCHED, seed)),
              {"seed": seed, "force": force, "matched_tokens": True, **TRAINED_ROWS[method]})
             for method in matched for seed in seeds]
    timed("train methods", run_jobs, jobs, workers)
    methods = [*methods, *(m + MATCHED for m in matched)]
    comparison_seeds = cfg.demo.comparison_seeds or seeds
    if "dpo" in methods:
        jobs = [(train_dpo, (cfg, run, model_name("dpo", seed), model_name("baseline", seed)),
                 {"seed": seed, "force": force}) for seed in comparison_seeds]
        timed("dpo", run_jobs, jobs, workers)
    decoded = {m: (m, "sample") for m in methods} | {m.name: (m.decodes, "rad") for m in METHODS if m.decodes}
    jobs = [(evaluate, (cfg, run, model_name(model, seed)), {"prompts": prompts, "decoding": decoding,
                                                             "force": force})
            for method, (model, decoding) in decoded.items() if method in methods
            for seed in (comparison_seeds if method in COMPARISON_METHODS else seeds)
            for prompts in cfg.demo.prompts if not (prompts == "lambada" and decoding == "rad")]
    jobs.sort(key=lambda job: job[2]["decoding"] != "rad")  # the slowest first, for a balanced finish
    timed("eval", run_jobs, jobs, workers)
    timings["total"] = sum(timings.values())
    show_report(run, timings)


def sweep_point_config(cfg: Config, objective: str, floor: float | None) -> Config:
    """The config a sweep point trains with: its objective and its own floor, None included (not the
    config's), so that its name states every setting it trains with."""
    point = with_overrides(cfg, "train", objective=objective)
    return dataclasses.replace(point, train=dataclasses.replace(point.train, penalty_floor=floor))


def sweep_budgets(cfg: Config, run: Run) -> list[float]:
    """sweep.budgets, plus the filter's dropped-token share (to four digits) with sweep.filter_budget."""
    budgets = list(cfg.sweep.budgets)
    if cfg.sweep.filter_budget:
        share = filter_share(run)
        budgets += [share] if share not in budgets else []
    return budgets


def budget_quantile(select_cfg: SelectConfig, budget: float) -> float:
    """Algorithm 1's quantile for a budget L (a fraction): select.quantile, or 1 - L / (2w + 1) where that is
    lower, since hits above tau and their windows can never mark more than (1 - q)(2w + 1) of the tokens."""
    if budget > 1:
        return select_cfg.quantile
    return round(min(select_cfg.quantile, 1 - budget / (2 * select_cfg.window + 1)), 6)


def cmd_sweep(args: argparse.Namespace) -> None:
    """Masks of `sweep.masks` reselected at every budget, trained with every objective at every lambda (and
    penalty floor) per demo seed, evaluated on `sweep.prompts`; the report then plots every point on toxicity
    against perplexity."""
    run = Run(args.run)
    # a repeated value would queue a model twice
    unique = {name: list(dict.fromkeys(values)) if values else None
              for name, values in (("masks", args.masks), ("budgets", args.budgets), ("lams", args.lams),
                                   ("objectives", args.objectives), ("units", args.units))}
    cfg = with_overrides(run.load_config(), "sweep", **unique, filter_budget=args.filter_budget or None)
    cfg = with_overrides(cfg, "demo", seeds=list(dict.fromkeys(args.seeds)) if args.seeds else None)
    masks = cfg.sweep.masks
    infos = {mask: run.require(run.mask(mask), "run `ifguide demo` (or `ifguide select`) first")
             for mask in masks}
    for mask, info in infos.items():
        if info.get("method") not in ("paper", "blocklist-tokens") or info.get("data", "full") != "full":
            raise IfguideError(f"mask '{mask}' was not selected by `ifguide select --method paper` or "
                               "`blocklist-tokens` on the full corpus; the sweep reselects masks at other "
                               "budgets, so sweep such masks")
    from .evaluation import evaluate
    from .selection import select
    from .training import train

    budgets = sweep_budgets(cfg, run)
    # the demo's point keeps the demo's names
    defaults = (cfg.select.budget, cfg.train.objective, cfg.train.lam)
    jobs, evals = [], []
    points = [(mask, info, budget, unit) for mask, info in infos.items() for unit in cfg.sweep.units
              for budget in budgets if unit == "tokens" or info["method"] == "paper"]
    if "documents" in cfg.sweep.units and any(info["method"] != "paper" for info in infos.values()):
        log.info("sweep: whole documents are swept for score masks only (the blocklist's are the filter's)")
    for mask, info, budget, unit in points:
        mask_name, _ = sweep_point_name(mask, budget, cfg.train.objective, cfg.train.lam, None, defaults,
                                        unit)
        if info["method"] == "paper":
            # influence/MODEL/scores/NAME -> MODEL/NAME
            scores = "/".join(Path(info["scores"]).parts[1:4:2])
            select(cfg, run, scores, name=mask_name, budget=budget, force=args.force,
                   **({"method": "documents"} if unit == "documents" else
                      {"method": "paper", "quantile": budget_quantile(cfg.select, budget)}))
        else:
            select(cfg, run, None, name=mask_name, budget=budget, method=info["method"], force=args.force)
        for objective in cfg.sweep.objectives:
            lams = cfg.sweep.lams if objective in LAMBDA_OBJECTIVES else [None]  # no lambda to weigh
            floors = cfg.sweep.penalty_floors if objective == "ascent" else [None]
            for lam in lams:
                for floor in floors:
                    _, method = sweep_point_name(mask, budget, objective, lam, floor, defaults, unit)
                    point = sweep_point_config(cfg, objective, floor)
                    # --matched-tokens: also at the filter's learned tokens, as METHOD-matched
                    variants = [False, True] if args.matched_tokens and objective in MASKING_OBJECTIVES \
                        else [False]
                    for seed, matched_tokens in itertools.product(cfg.demo.seeds, variants):
                        name = model_name(method + (MATCHED if matched_tokens else ""), seed)
                        jobs.append((train, (point, run, name),
                                     {"seed": seed, "mask": mask_name, "lam": lam, "force": args.force,
                                      "matched_tokens": matched_tokens}))
                        evals += [(evaluate, (cfg, run, name), {"prompts": prompts, "force": args.force})
                                  for prompts in cfg.sweep.prompts]
    log.info(f"sweep: {len(jobs)} models ({len(masks)} masks x {len(budgets)} budgets x units "
             f"{', '.join(cfg.sweep.units)} x objectives "
             f"{', '.join(cfg.sweep.objectives)} (lambdas {', '.join(f'{x:g}' for x in cfg.sweep.lams)} for "
             f"ascent and unlikelihood) x {len(cfg.demo.seeds)} seeds"
             + (", masking points also at the filter's learned tokens)" if args.matched_tokens else ")"))
    run_jobs(jobs, cfg.demo.workers)
    run_jobs(evals, cfg.demo.workers)
    show_report(run)
