"""CLI commands: each maps arguments onto one stage; `demo` chains them all on the embedded default."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from .artifacts import Run
from .config import load_config, with_overrides
from .errors import IfguideError

# Each command checks its arguments and the run's config first and imports the heavy stage modules (torch,
# transformers, kronfluence) only after, so a mistake is reported at once.


def cmd_prepare(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = load_config(args.config)
    run.check_config(cfg, force=args.force)
    from .prepare import prepare

    prepare(cfg, run, force=args.force, fetch=args.fetch)
    run.save_config(cfg)  # only once the data it describes exists


def cmd_train(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(with_overrides(run.load_config(), "train", lam=args.lam, epochs=args.epochs), None,
                         seed=args.seed)
    run.model(args.name)
    from .train import train

    train(cfg, run, args.name, seed=args.seed, mask=args.mask, init=args.init, data=args.data, arch=args.arch,
          force=args.force)


def cmd_reward(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    from .reward import train_reward_model

    train_reward_model(cfg, run, force=args.force)


def cmd_dpo(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    run.model(args.name)
    from .dpo import train_dpo

    train_dpo(cfg, run, args.name, args.init, seed=args.seed, force=args.force)


def cmd_factors(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    run.factors(args.model)
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
    cfg = with_overrides(run.load_config(), "influence", token_scores=args.token_scores, normalize=args.normalize)
    run.scores(args.model, args.name or args.query or cfg.influence.query)
    from .influence import scores

    scores(cfg, run, args.model, name=args.name, query=args.query, part=part, force=args.force)


def cmd_select(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = with_overrides(run.load_config(), "select", quantile=args.quantile, window=args.window, budget=args.budget,
                         method=args.method)
    if args.name is not None:
        run.mask(args.name)
    from .select import select

    select(cfg, run, args.scores, name=args.name, force=args.force)


def cmd_eval(args: argparse.Namespace) -> None:
    run = Run(args.run)
    cfg = run.load_config()
    run.model(args.model)
    from .evaluate import evaluate

    evaluate(cfg, run, args.model, prompts=args.prompts, scorers=args.scorer, decoding=args.decoding, force=args.force)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import report

    print(report(Run(args.run)))


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: list[tuple[Callable, tuple, dict]], workers: int) -> None:
    """Run independent stage calls, side by side in single-thread processes when `workers` > 1.

    On small CPU models, two single-thread jobs give more total throughput than one two-thread job.
    """
    if workers <= 1 or len(jobs) <= 1:
        for fn, args, kwargs in jobs:
            fn(*args, **kwargs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread) as pool:
        for future in [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in jobs]:
            future.result()


COMPARISON_METHODS = ("dpo", "rad", "ifguide+rad")


def cmd_demo(args: argparse.Namespace) -> None:
    """prepare -> baseline -> factors -> scores -> select -> ifguide and comparison models -> eval -> report."""
    from .dpo import train_dpo
    from .evaluate import evaluate
    from .influence import factors, scores
    from .prepare import prepare
    from .report import report
    from .reward import train_reward_model
    from .select import select
    from .train import train

    preset = args.config or ("quick" if args.quick else "demo")
    run = Run(args.run or f"runs/{'quick' if args.quick else 'demo'}")
    cfg = load_config(preset)
    run.check_config(cfg, force=args.force)
    timings: dict[str, float] = {}
    force, workers = args.force, cfg.demo.workers

    def timed(stage: str, fn: Callable, *a, **kw) -> None:
        start = time.perf_counter()
        fn(*a, **kw)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    timed("prepare", prepare, cfg, run, force=force)
    run.save_config(cfg)
    seeds, methods = cfg.demo.seeds, cfg.demo.methods
    scorer_model = "proxy" if cfg.demo.proxy else f"baseline-s{seeds[0]}"
    jobs = [(train, (cfg, run, f"baseline-s{seed}"), {"seed": seed, "force": force}) for seed in seeds]
    if cfg.demo.proxy:
        jobs.append((train, (cfg, run, "proxy"), {"seed": seeds[0], "arch": "proxy", "force": force}))
    timed("train baseline", run_jobs, jobs, workers)
    timed("factors", factors, cfg, run, scorer_model, force=force)
    kinds = {"ifguide": "toxic-minus-nontoxic", "ifguide-standard": "toxic"}
    for method, kind in kinds.items():
        if method in methods:
            timed("scores", scores, cfg, run, scorer_model, name=kind, query=kind, force=force)
            timed("select", select, cfg, run, f"{scorer_model}/{kind}", name=method, method="paper", force=force)
    if "blocklist-tokens" in methods:
        timed("select", select, cfg, run, None, name="blocklist-tokens", method="blocklist-tokens", force=force)
    masks = {*kinds, "blocklist-tokens"}
    trained = [m for m in methods if m in masks or m == "filter"]
    jobs = [(train, (cfg, run, f"{method}-s{seed}"),
             {"seed": seed, "force": force, **({"mask": method} if method in masks else {"data": "filter"})})
            for method in trained for seed in seeds]
    if set(COMPARISON_METHODS) & set(methods):
        jobs.insert(0, (train_reward_model, (cfg, run), {"force": force}))  # the longest job first
    timed("train methods", run_jobs, jobs, workers)
    comparison_seeds = cfg.demo.comparison_seeds or seeds
    if "dpo" in methods:
        jobs = [(train_dpo, (cfg, run, f"dpo-s{seed}", f"baseline-s{seed}"), {"seed": seed, "force": force})
                for seed in comparison_seeds]
        timed("dpo", run_jobs, jobs, workers)
    decoded = {m: (m, "sample") for m in methods} | {"rad": ("baseline", "rad"), "ifguide+rad": ("ifguide", "rad")}
    jobs = [(evaluate, (cfg, run, f"{model}-s{seed}"), {"prompts": prompts, "decoding": decoding, "force": force})
            for method, (model, decoding) in decoded.items() if method in methods
            for seed in (comparison_seeds if method in COMPARISON_METHODS else seeds)
            for prompts in cfg.demo.prompts if not (prompts == "lambada" and decoding == "rad")]
    jobs.sort(key=lambda job: job[2]["decoding"] != "rad")  # the slowest first, for a balanced finish
    timed("eval", run_jobs, jobs, workers)
    timings["total"] = sum(timings.values())
    print(report(run, timings=timings))
    print(f"demo: report in {run.report() / 'results.md'}")
