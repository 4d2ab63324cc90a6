"""The checks of a training's arguments that need nothing heavy (no torch, no datasets): the CLI runs them
before it imports anything, and `train` runs them first, so a mistake is one line at once either way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import Run
from ..config import Config, ModelConfig
from ..errors import IfguideError
from ..names import LAMBDA_OBJECTIVES, MASKING_OBJECTIVES


@dataclass
class CheckedTraining:
    """What a training reads, once checked: the model config, the run's data and mask (their info.json) and
    the checkpoint it starts from (None: from scratch)."""

    model: ModelConfig
    data_info: dict
    mask_info: dict
    start_from: Path | None


def check_training(cfg: Config, run: Run, mask: str | None, init: str | None, arch: str,
                   lam: float | None = None, objective: str | None = None,
                   matched_tokens: bool = False) -> CheckedTraining:
    """Refuse, in one line, a training whose config section, data, mask or starting checkpoint is missing or
    stale, or a setting that could not act: `lam` and `objective` are the --lam and --objective given (None:
    not given), which need a mask, as `matched_tokens` (--matched-tokens) does."""
    model_cfg = cfg.proxy_model if arch == "proxy" else cfg.model
    if model_cfg is None:
        raise IfguideError("config: --arch proxy needs a proxy_model section in the config")
    if cfg.train.objective == "conditional" and not mask:
        raise IfguideError("train.objective conditional needs --mask (the tokens whose sentences "
                           "are misaligned)")
    given = (("--lam", lam), ("--objective", objective), ("--matched-tokens", matched_tokens or None))
    penalty_flags = [flag for flag, value in given if value is not None]
    if penalty_flags and not mask:
        verb, them = ("act", "them") if len(penalty_flags) > 1 else ("acts", "it")
        raise IfguideError(f"{' and '.join(penalty_flags)} {verb} only on a mask's tokens; add --mask NAME, "
                           f"or drop {them} to train a plain model")
    if matched_tokens and cfg.train.objective not in MASKING_OBJECTIVES:
        raise IfguideError(f"--matched-tokens needs an objective that trains on every block "
                           f"({', '.join(MASKING_OBJECTIVES)}); objective {cfg.train.objective} already "
                           "sets the blocks it learns")
    if mask and lam is not None and cfg.train.objective not in LAMBDA_OBJECTIVES:
        raise IfguideError(f"--lam weighs only objectives {' and '.join(LAMBDA_OBJECTIVES)}; objective "
                           f"{cfg.train.objective} has no lambda; remove --lam")
    if mask and cfg.train.penalty_floor is not None and cfg.train.objective != "ascent":
        raise IfguideError(f"train.penalty_floor acts only under objective ascent, not "
                           f"{cfg.train.objective}; remove it from the config")
    start_from = run.checkpoint(init) if init else \
        run.checkpoint(model_cfg.init_from, "model.init_from") if model_cfg.init_from else None
    mask_info = run.require(run.mask(mask), f"run `ifguide select` to build mask '{mask}'") if mask else {}
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    return CheckedTraining(model_cfg, data_info, mask_info, start_from)
