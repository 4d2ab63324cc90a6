"""CLI commands: each maps arguments onto one stage; `demo` chains them all on the embedded default."""

from __future__ import annotations

import argparse
import time

from .artifacts import Run
from .config import load_config


def cmd_prepare(args: argparse.Namespace) -> None:
    from .prepare import prepare

    run = Run(args.run)
    cfg = load_config(args.config)
    run.save_config(cfg, force=args.force)
    prepare(cfg, run, force=args.force, fetch=args.fetch)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import train

    run = Run(args.run)
    train(run.load_config(), run, args.name, seed=args.seed, mask=args.mask, lam=args.lam, init=args.init,
          data=args.data, arch=args.arch, force=args.force)


def cmd_factors(args: argparse.Namespace) -> None:
    from .influence import factors

    run = Run(args.run)
    factors(run.load_config(), run, args.model, force=args.force)


def cmd_scores(args: argparse.Namespace) -> None:
    from .influence import scores

    run = Run(args.run)
    scores(run.load_config(), run, args.model, name=args.name, query=args.query, force=args.force)


def cmd_select(args: argparse.Namespace) -> None:
    from .select import select

    run = Run(args.run)
    select(run.load_config(), run, args.scores, name=args.name, quantile=args.quantile, window=args.window,
           budget=args.budget, force=args.force)
