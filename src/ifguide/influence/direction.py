"""The query direction P: the preconditioned query gradient, computed once per query kind and stored in the
run.

P_m = H_m^{-1} g_m for every tracked Linear m, where g_m = d/dW_m sum_r w_r L_r (signed query weights, see
task.query_weights) in Kronfluence's layout [dW | db], and H_m^{-1} is the fitted factors' inverse (EK-FAC by
default) with Kronfluence's own damping, applied by Kronfluence's own `precondition_gradient`. An LM head
fitted apart (influence.head_strategy) is preconditioned with its own factors and strategy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from kronfluence.arguments import ScoreArguments
from kronfluence.factor.config import FactorConfig
from safetensors.torch import save_file
from torch import nn

from ..artifacts import load_tensors, read_info
from ..errors import IfguideError
from .ekfac import HEAD_ANALYSIS, load_factor_storage
from .task import QueryRows, weighted_query_loss

DIRECTION_FILE = "direction.safetensors"


def query_gradient(model: nn.Module, queries, kind: str, tracked: list[str],
                   batch_size: int) -> dict[str, torch.Tensor]:
    """d/dW sum_r w_r L_r per tracked Linear, as [dW | db] (out x in+1; out x in without a bias)."""
    rows = QueryRows(queries, kind)
    modules = dict(model.named_modules())
    params = {name: [modules[name].weight] + ([modules[name].bias] if modules[name].bias is not None else [])
              for name in tracked}
    flat = [p for group in params.values() for p in group]
    totals = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    model.eval()
    for batch in torch.utils.data.DataLoader(rows, batch_size=batch_size):
        for total, grad in zip(totals, torch.autograd.grad(weighted_query_loss(batch, model), flat)):
            total += grad
    out, k = {}, 0
    for name, group in params.items():
        parts = [totals[k].float()] + ([totals[k + 1].float()[:, None]] if len(group) == 2 else [])
        out[name] = torch.cat(parts, dim=1)
        k += len(group)
    return out


def precondition(gradients: dict[str, torch.Tensor], factors_root: Path, strategy: str, damping: float | None,
                 fitted_apart: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Apply the stored factors' damped inverse to each module's gradient, exactly as Kronfluence scores
    do; `fitted_apart`: the modules (the LM head) fitted in HEAD_ANALYSIS under a strategy of their own."""
    apart = fitted_apart or {}
    storage = load_factor_storage(factors_root, [m for m in gradients if m not in apart])
    storage |= load_factor_storage(factors_root, [m for m in gradients if m in apart], HEAD_ANALYSIS)
    args = ScoreArguments(damping_factor=damping)
    out = {}
    for name, gradient in gradients.items():
        config = FactorConfig.CONFIGS[apart.get(name, strategy)]
        config.prepare(storage[name], args, torch.device("cpu"))
        out[name] = config.precondition_gradient(gradient[None].clone(), storage[name])[0].contiguous()
    return out


def compute_direction(model: nn.Module, queries, kind: str, tracked: list[str], factors_root: Path,
                      strategy: str, damping: float | None, batch_size: int,
                      fitted_apart: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """P for one query kind: query gradient, then preconditioning."""
    return precondition(query_gradient(model, queries, kind, tracked, batch_size), factors_root, strategy,
                        damping, fitted_apart)


def save_direction(out: Path, direction: dict[str, torch.Tensor]) -> None:
    save_file(direction, str(out / DIRECTION_FILE))


def load_direction(path: Path, expect_inputs: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A stored P and its info; refused when it was built from other factors, queries or model than
    expected."""
    info = read_info(path)
    if info is None:
        raise IfguideError(f"{path} holds no query direction; run `ifguide scores` to build it")
    stored = info["recipe"]["inputs"]
    stale = [key for key, value in expect_inputs.items() if stored.get(key) != value]
    if stale:
        raise IfguideError(f"query direction {path} was built from other {', '.join(stale)}; "
                           "rerun `ifguide scores --force` to rebuild it")
    return load_tensors(path, DIRECTION_FILE), info
