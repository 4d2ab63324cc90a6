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
FACTORS = "factors"
warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")


def analyzer(model: nn.Module, tracked: list[str], output_dir: Path) -> Analyzer:
    """A Kronfluence analyzer on a private copy of `model` (Kronfluence wraps modules in place)."""
    task = LanguageModelTask(tracked)
    model = prepare_model(copy.deepcopy(model), task)
    return Analyzer(analysis_name=ANALYSIS, model=model, task=task, cpu=not torch.cuda.is_available(),
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


def factor_arguments(icfg: InfluenceConfig) -> FactorArguments:
    return FactorArguments(strategy=icfg.strategy, covariance_max_examples=icfg.covariance_max_examples,
                           lambda_max_examples=icfg.lambda_max_examples)


def factor_bytes(model: nn.Module, tracked: list[str], strategy: str) -> int:
    """The memory the factors of the tracked modules take (float32): EK-FAC and KFAC keep, per module, the
    input covariance (bias included) and the output-gradient covariance, their eigenvectors and EK-FAC's
    corrected eigenvalues; diagonal keeps one value per weight, identity nothing."""
    modules = dict(model.named_modules())
    total = 0
    for name in tracked:
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
    memory the factors take first, and refuses in one line where that is above what is free."""
    tracked = discover_tracked_modules(model, icfg.tracked_modules, icfg.last_layers, icfg.include_head,
                                       icfg.head_max_vocab)
    needed, free = factor_bytes(model, tracked, icfg.strategy), memory_available()
    log.info(f"factors: {len(tracked)} modules, {needed / 2 ** 20:,.1f} MiB of {icfg.strategy} factors "
             f"({free / 2 ** 30:,.1f} GiB free)")
    if needed > free:
        raise IfguideError(f"factors: the {icfg.strategy} factors of {len(tracked)} modules need "
                           f"{needed / 2 ** 30:.1f} GiB, above the {free / 2 ** 30:.1f} GiB free; "
                           "track fewer layers (influence.last_layers), leave the head out "
                           "(influence.include_head: false) or use influence.strategy diagonal")
    fitter = analyzer(model, tracked, out)
    dataset, args = BlockDataset(blocks), factor_arguments(icfg)
    timings = {}
    set_seed(seed)
    common = dict(factors_name=FACTORS, factor_args=args, overwrite_output_dir=True)
    with frozen_heap():
        start = time.perf_counter()
        fitter.fit_covariance_matrices(dataset=dataset, per_device_batch_size=icfg.factor_batch_size,
                                       **common)
        timings["covariance_s"] = time.perf_counter() - start
        start = time.perf_counter()
        fitter.perform_eigendecomposition(**common)
        timings["eigendecomposition_s"] = time.perf_counter() - start
        start = time.perf_counter()
        fitter.fit_lambda_matrices(dataset=dataset, per_device_batch_size=icfg.factor_batch_size, **common)
        timings["lambda_s"] = time.perf_counter() - start
    return {"tracked_modules": tracked, "strategy": icfg.strategy, **timings}


def factors_dir(root: Path) -> Path:
    """Where Kronfluence keeps the factors inside a factors artifact."""
    return root / ANALYSIS / f"factors_{FACTORS}"


def load_factor_storage(root: Path, modules: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per tracked module, every stored factor (file stem -> tensor), as Kronfluence's module storage holds
    them."""
    storage: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for file in sorted(factors_dir(root).glob("*.safetensors")):
        tensors = load_tensors(root, str(file.relative_to(root)))
        for name in modules:
            if name in tensors:
                storage[name][file.stem] = tensors[name]
    return storage
