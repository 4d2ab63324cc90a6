"""EK-FAC (or KFAC, diagonal, identity) factors, fitted by Kronfluence on the training blocks."""

from __future__ import annotations

import copy
import gc
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from torch import nn
from transformers import set_seed

from ..artifacts import load_tensors
from ..config import InfluenceConfig
from ..console import progress_bars_off
from ..data import BlockDataset
from ..errors import IfguideError
from .task import LanguageModelTask, discover_tracked_modules

log = logging.getLogger(__name__)
ANALYSIS = "kronfluence"
HEAD_ANALYSIS = "kronfluence-head"  # the LM head, fitted apart under influence.head_strategy
FACTORS = "factors"
# the strategies that keep no matrix of a module's width squared: a head of any vocabulary fits
SQUARE_FREE = ("diagonal", "identity")
warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")


def analyzer(model: nn.Module, tracked: list[str], output_dir: Path, analysis: str = ANALYSIS) -> Analyzer:
    """A Kronfluence analyzer on a private copy of `model` (Kronfluence wraps modules in place)."""
    task = LanguageModelTask(tracked)
    model = prepare_model(copy.deepcopy(model), task)
    return Analyzer(analysis_name=analysis, model=model, task=task, cpu=not torch.cuda.is_available(),
                    output_dir=str(output_dir), disable_tqdm=progress_bars_off())


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Kronfluence calls gc.collect() between phases; freezing the objects alive now spares each call a full
    scan of them (about 0.3 s per call here). Unfreezing afterwards lets any garbage among them be
    collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def factor_arguments(icfg: InfluenceConfig, strategy: str) -> FactorArguments:
    return FactorArguments(strategy=strategy, covariance_max_examples=icfg.covariance_max_examples,
                           lambda_max_examples=icfg.lambda_max_examples)


def head_strategy(icfg: InfluenceConfig) -> str:
    """The LM head's factor strategy: influence.head_strategy, or influence.strategy where that is unset."""
    return icfg.head_strategy or icfg.strategy


def head_vocab_limit(icfg: InfluenceConfig) -> int | None:
    """The largest vocabulary whose head is tracked: influence.head_max_vocab where the head's strategy keeps
    vocabulary x vocabulary matrices (EK-FAC, KFAC); no limit otherwise."""
    return None if head_strategy(icfg) in SQUARE_FREE else icfg.head_max_vocab


def module_strategies(model: nn.Module, tracked: list[str], icfg: InfluenceConfig) -> dict[str, str]:
    """Each tracked module's factor strategy: influence.strategy, the head's own for the LM head."""
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    return {name: head_strategy(icfg) if modules[name] is head else icfg.strategy for name in tracked}


def factor_bytes(model: nn.Module, strategies: dict[str, str]) -> int:
    """The memory the factors of the tracked modules take (float32), by each module's strategy: EK-FAC and
    KFAC keep the input covariance (bias included) and the output-gradient covariance, their eigenvectors and
    EK-FAC's corrected eigenvalues; diagonal keeps one value per weight, identity nothing."""
    modules = dict(model.named_modules())
    total = 0
    for name, strategy in strategies.items():
        linear = modules[name]
        inputs = linear.in_features + (linear.bias is not None)
        outputs = linear.out_features
        total += {"ekfac": 2 * inputs ** 2 + 2 * outputs ** 2 + inputs * outputs,
                  "kfac": 2 * inputs ** 2 + 2 * outputs ** 2, "diagonal": inputs * outputs}.get(strategy, 0)
    return 4 * total


def memory_available() -> int:
    """Bytes free where the factors are fitted: the GPU's free memory, or the machine's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_factors(model: nn.Module, blocks: np.ndarray, icfg: InfluenceConfig, out: Path, seed: int) -> dict:
    """Fit covariance, eigendecomposition and lambda factors into `out`; returns per-phase seconds. Says the
    memory the factors take first, and refuses in one line where that is above what is free. A head whose
    strategy differs from influence.strategy (influence.head_strategy) is fitted apart, in HEAD_ANALYSIS."""
    tracked = discover_tracked_modules(model, icfg.tracked_modules, icfg.last_layers, icfg.include_head,
                                       head_vocab_limit(icfg))
    strategies = module_strategies(model, tracked, icfg)
    apart = {name: strategy for name, strategy in strategies.items() if strategy != icfg.strategy}
    needed, free = factor_bytes(model, strategies), memory_available()
    kinds = icfg.strategy + "".join(f", {strategy} for {name}" for name, strategy in apart.items())
    log.info(f"factors: {len(tracked)} modules, {needed / 2 ** 20:,.1f} MiB of {kinds} factors "
             f"({free / 2 ** 30:,.1f} GiB free)")
    if needed > free:
        raise IfguideError(f"factors: the {kinds} factors of {len(tracked)} modules need "
                           f"{needed / 2 ** 30:.1f} GiB, above the {free / 2 ** 30:.1f} GiB free; "
                           "track fewer layers (influence.last_layers), leave the head out "
                           "(influence.include_head: false), fit it with influence.head_strategy diagonal, "
                           "or use influence.strategy diagonal")
    dataset, timings = BlockDataset(blocks), {}
    parts = [(ANALYSIS, icfg.strategy, [name for name in tracked if name not in apart])]
    parts += [(HEAD_ANALYSIS, strategy, [name]) for name, strategy in apart.items()]
    with frozen_heap():
        for analysis, strategy, modules in parts:
            if modules:
                set_seed(seed)
                for phase, seconds in fit_phases(analyzer(model, modules, out, analysis), dataset, icfg,
                                                 strategy).items():
                    timings[phase] = timings.get(phase, 0.0) + seconds
    return {"tracked_modules": tracked, "strategy": icfg.strategy,
            **({"fitted_apart": apart} if apart else {}), **timings}


def fit_phases(fitter: Analyzer, dataset: BlockDataset, icfg: InfluenceConfig, strategy: str) -> dict:
    """Kronfluence's three phases on one analyzer's modules under `strategy`; seconds per phase."""
    common = dict(factors_name=FACTORS, factor_args=factor_arguments(icfg, strategy),
                  overwrite_output_dir=True)
    data = dict(dataset=dataset, per_device_batch_size=icfg.factor_batch_size)
    timings = {}
    for phase, fit, kwargs in (("covariance_s", fitter.fit_covariance_matrices, data),
                               ("eigendecomposition_s", fitter.perform_eigendecomposition, {}),
                               ("lambda_s", fitter.fit_lambda_matrices, data)):
        start = time.perf_counter()
        fit(**kwargs, **common)
        timings[phase] = time.perf_counter() - start
    return timings


def factors_dir(root: Path, analysis: str = ANALYSIS) -> Path:
    """Where Kronfluence keeps the factors inside a factors artifact."""
    return root / analysis / f"factors_{FACTORS}"


def load_factor_storage(root: Path, modules: list[str], analysis: str = ANALYSIS) -> dict[str, dict[str,
                                                                                                torch.Tensor]]:
    """Per tracked module, every stored factor (file stem -> tensor), as Kronfluence's module storage holds
    them."""
    storage: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for file in sorted(factors_dir(root, analysis).glob("*.safetensors")):
        tensors = load_tensors(root, str(file.relative_to(root)))
        for name in modules:
            if name in tensors:
                storage[name][file.stem] = tensors[name]
    return storage
