"""Stage 3 commands: `ifguide factors` and `ifguide scores` (query direction P, then per-token score shards)."""

from __future__ import annotations

import time
from pathlib import Path

from ..artifacts import Run, Stage, read_info, write_json
from ..config import Config, config_to_dict, with_overrides
from ..model import load_model
from ..train import block_array
from .direction import compute_direction, load_direction, save_direction
from .factors import fit_factors
from .shards import write_shards
from .token_scores import score_blocks, token_scorer

FACTOR_KEYS = ("strategy", "tracked_modules", "last_layers", "covariance_max_examples", "lambda_max_examples")


def factors(cfg: Config, run: Run, model_name: str, force: bool = False) -> Path:
    """`ifguide factors`: EK-FAC factors of model `model_name` on the run's training blocks."""
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    icfg = cfg.influence
    recipe = {k: v for k, v in config_to_dict(icfg).items() if k in FACTOR_KEYS}
    stage = Stage(run.factors(model_name), "factors", {**recipe, "seed": cfg.seed},
                  {"model": model_info["fingerprint"], "blocks": data_info["blocks_fingerprint"]})
    if stage.is_done(force):
        return run.factors(model_name)
    model = load_model(run.model(model_name))
    blocks = block_array(run)
    print(f"factors: {icfg.strategy} on {len(blocks):,} blocks of model '{model_name}'")
    with stage.build() as out:
        info = fit_factors(model, blocks, icfg, out, cfg.seed)
        n_cov = min(len(blocks), icfg.covariance_max_examples or len(blocks))
        n_lam = min(len(blocks), icfg.lambda_max_examples or len(blocks))
        tokens = blocks.shape[1]
        info.update(covariance_tokens_per_s=n_cov * tokens / info["covariance_s"],
                    lambda_tokens_per_s=n_lam * tokens / info["lambda_s"],
                    covariance_examples=n_cov, lambda_examples=n_lam)
        write_json(out / "info.json", info)
    print(f"factors: covariance {info['covariance_s']:.1f}s, eigendecomposition "
          f"{info['eigendecomposition_s']:.1f}s, lambda {info['lambda_s']:.1f}s")
    return run.factors(model_name)


def direction_inputs(run: Run, model_name: str) -> dict[str, str]:
    """The fingerprints a query direction depends on: model, factors and queries."""
    factors_info = run.require(run.factors(model_name), f"run `ifguide factors --model {model_name}` first")
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    return {"model": model_info["fingerprint"], "factors": factors_info["fingerprint"],
            "queries": data_info["queries_fingerprint"]}


def query_direction(cfg: Config, run: Run, model_name: str, query: str, force: bool = False) -> Path:
    """RUN/influence/MODEL/directions/QUERY: the preconditioned query gradient P, computed once."""
    from datasets import load_from_disk

    icfg = cfg.influence
    inputs = direction_inputs(run, model_name)
    stage = Stage(run.direction(model_name, query), "direction", {"query": query, "damping": icfg.damping}, inputs)
    if stage.is_done(force):
        return run.direction(model_name, query)
    factors_info = read_info(run.factors(model_name))  # present: direction_inputs required it
    model = load_model(run.model(model_name))
    queries = load_from_disk(str(run.data() / "queries"))
    start = time.perf_counter()
    with stage.build() as out:
        p = compute_direction(model, queries, query, factors_info["tracked_modules"], run.factors(model_name),
                              factors_info["strategy"], icfg.damping, icfg.query_batch_size)
        save_direction(out, p)
        write_json(out / "info.json", {"tracked_modules": factors_info["tracked_modules"],
                                       "strategy": factors_info["strategy"], "seconds": time.perf_counter() - start})
    print(f"direction {query}: preconditioned query gradient over {len(p)} modules "
          f"in {time.perf_counter() - start:.1f}s")
    return run.direction(model_name, query)


def scores(cfg: Config, run: Run, model_name: str, name: str | None = None, query: str | None = None,
           token_scores: str | None = None, normalize: str | None = None, force: bool = False) -> Path:
    """`ifguide scores`: P for the query, then per-token scores of every training block in memory-mappable shards."""
    cfg = with_overrides(cfg, "influence", token_scores=token_scores, normalize=normalize)
    icfg = cfg.influence
    query = query or icfg.query
    name = name or query
    direction_path = query_direction(cfg, run, model_name, query, force)
    p, direction_info = load_direction(direction_path, direction_inputs(run, model_name))
    blocks_fp = run.require(run.data(), "run `ifguide prepare` first")["blocks_fingerprint"]
    recipe = {"query": query, "token_scores": icfg.token_scores, "normalize": icfg.normalize,
              "shard_blocks": icfg.shard_blocks, "dtype": icfg.score_dtype}
    stage = Stage(run.scores(model_name, name), "scores", recipe,
                  {"direction": direction_info["fingerprint"], "blocks": blocks_fp})
    if stage.is_done(force):
        return run.scores(model_name, name)
    scorer = token_scorer(icfg.token_scores, load_model(run.model(model_name)), p, icfg.normalize)
    blocks = block_array(run)
    with stage.build() as out:
        start_time = time.perf_counter()
        shards = score_blocks(scorer, blocks, icfg.shard_blocks, icfg.train_batch_size)
        info = write_shards(out, shards, blocks.shape, icfg.score_dtype, desc=f"scores {name}")
        elapsed = time.perf_counter() - start_time
        write_json(out / "info.json", {**info, "query": query, "model": model_name, "blocks_fingerprint": blocks_fp,
                                       "token_scores": icfg.token_scores, "score_s": elapsed,
                                       "score_tokens_per_s": blocks.size / elapsed})
    print(f"scores: {blocks.shape[0]:,} x {blocks.shape[1]} {icfg.token_scores} scores in {len(info['shards'])} "
          f"shards, {elapsed:.1f}s ({blocks.size / elapsed:,.0f} tokens/s)")
    return run.scores(model_name, name)
