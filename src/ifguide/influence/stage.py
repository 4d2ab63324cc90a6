"""Stage 3 commands: `ifguide factors` and `ifguide scores` (query direction P, then per-token score
shards)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import PreTrainedModel

from ..artifacts import INFO, RESUME, Journal, Run, Stage, read_info, wait_for_builder, write_json
from ..config import Config, config_to_dict, with_overrides
from ..data import block_array, training_blocks
from ..errors import IfguideError
from ..model import load_model, with_linear_projections
from ..names import HEAD_SUFFIX
from ..queries import BUILTIN, query_artifacts, query_set
from .direction import compute_direction, load_direction, save_direction
from .ekfac import fit_factors, head_strategy, head_vocab_limit
from .shards import part_dir, shard_range, write_shards
from .task import head_module
from .token_scores import score_blocks, token_scorer

log = logging.getLogger(__name__)


def analysis_model(run: Run, model_name: str) -> PreTrainedModel:
    """A trained model as the influence stages see it: GPT-2 Conv1D projections as equal nn.Linear modules."""
    return with_linear_projections(load_model(run.model(model_name)))


FACTOR_KEYS = ("strategy", "tracked_modules", "last_layers", "covariance_max_examples", "lambda_max_examples",
               "include_head")


def head_that_fits(cfg: Config, run: Run, model_name: str) -> Config:
    """`cfg`, with the LM head left out (one warning line) where the model's vocabulary is above
    influence.head_max_vocab and the head's strategy keeps two vocabulary x vocabulary matrices (EK-FAC,
    KFAC)."""
    icfg = cfg.influence
    config = run.model(model_name) / "config.json"
    vocab = json.loads(config.read_text()).get("vocab_size", 0) if config.is_file() else 0
    limit = head_vocab_limit(icfg)
    if not icfg.include_head or limit is None or vocab <= limit:
        return cfg
    log.warning(f"influence: the LM head is left out: its {head_strategy(icfg)} factors for {vocab:,} tokens "
                f"need {8 * vocab ** 2 / 2 ** 30:.1f} GiB, above influence.head_max_vocab "
                f"({limit:,}); influence.head_strategy: diagonal fits it")
    return with_overrides(cfg, "influence", include_head=False)


def factors(cfg: Config, run: Run, model_name: str, force: bool = False) -> Path:
    """`ifguide factors`: EK-FAC factors of model `model_name` on the run's training blocks."""
    cfg = head_that_fits(cfg, run, model_name)
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    icfg = cfg.influence
    recipe = {k: v for k, v in config_to_dict(icfg).items() if k in FACTOR_KEYS}
    if icfg.include_head and icfg.head_strategy:  # in the recipe only when set: earlier factors stay current
        recipe["head_strategy"] = icfg.head_strategy
    stage = Stage(run.factors(model_name), "factors", {**recipe, "seed": cfg.seed},
                  {"model": model_info["fingerprint"], "blocks": data_info["blocks_fingerprint"]},
                  (run.model(model_name), run.data()))
    if stage.is_done(force):
        return run.factors(model_name)
    with stage.build() as out:
        model = analysis_model(run, model_name)
        blocks = block_array(run)
        log.info(f"factors: {icfg.strategy} on {len(blocks):,} blocks of model '{model_name}'")
        info = fit_factors(model, blocks, icfg, out, cfg.seed)
        n_cov = min(len(blocks), icfg.covariance_max_examples or len(blocks))
        n_lam = min(len(blocks), icfg.lambda_max_examples or len(blocks))
        tokens = blocks.shape[1]
        info.update(covariance_tokens_per_s=n_cov * tokens / info["covariance_s"],
                    lambda_tokens_per_s=n_lam * tokens / info["lambda_s"],
                    covariance_examples=n_cov, lambda_examples=n_lam)
        write_json(out / "info.json", info)
    log.info(f"factors: covariance {info['covariance_s']:.1f}s, eigendecomposition "
             f"{info['eigendecomposition_s']:.1f}s, lambda {info['lambda_s']:.1f}s")
    return run.factors(model_name)


def direction_inputs(run: Run, model_name: str, queries: str = BUILTIN) -> dict[str, str]:
    """The fingerprints a query direction depends on: model, factors and query set."""
    factors_info = run.require(run.factors(model_name), f"run `ifguide factors --model {model_name}` first")
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    return {"model": model_info["fingerprint"], "factors": factors_info["fingerprint"],
            "queries": query_set(run, queries)[1]}


def direction_modules(model: PreTrainedModel, factors_info: dict, include_head: bool,
                      model_name: str) -> list[str]:
    """The fitted modules P spans: the LM head only with `include_head` (its factors are per module, so
    factors fitted with the head serve both settings)."""
    head = head_module(model)
    modules = [m for m in factors_info["tracked_modules"] if include_head or m != head]
    if include_head and head not in modules:
        raise IfguideError(f"influence.include_head: the factors of '{model_name}' do not track the LM head; "
                           f"refit them with `ifguide factors --model {model_name} --include-head --force`")
    return modules


def direction_name(queries: str, query: str, include_head: bool = False) -> str:
    """The folder of a direction (and default scores name): the query kind for the built-in RTP rows,
    QUERIES-KIND for a queries artifact; `-head` when the LM head is tracked."""
    name = query if queries == BUILTIN else f"{queries}-{query}"
    return name + (f"-{HEAD_SUFFIX}" if include_head else "")


def scores_name(queries: str, query: str, include_head: bool = False, data: str = "full") -> str:
    """The default name of a score set: its direction's, with `-filter` for the filtered corpus's blocks."""
    return direction_name(queries, query, include_head) + ("-filter" if data == "filter" else "")


def query_direction(cfg: Config, run: Run, model_name: str, query: str, force: bool = False,
                    wait: bool = False) -> Path:
    """RUN/influence/MODEL/directions/NAME: the preconditioned query gradient P of the query set
    `influence.queries`, computed once; with `wait`, a process finding another one building it waits for that
    one instead of failing."""
    cfg = head_that_fits(cfg, run, model_name)
    icfg = cfg.influence
    inputs = direction_inputs(run, model_name, icfg.queries)
    path = run.direction(model_name, direction_name(icfg.queries, query, icfg.include_head))
    read = (run.model(model_name), run.factors(model_name), *query_artifacts(run, icfg.queries))
    stage = Stage(path, "direction", {"query": query, "damping": icfg.damping, "queries": icfg.queries,
                                      "include_head": icfg.include_head}, inputs, read)
    if wait and not force:
        wait_for_builder(stage.path)
    if stage.is_done(force):
        return path
    with stage.build() as out:
        factors_info = read_info(run.factors(model_name))  # present: direction_inputs required it
        model = analysis_model(run, model_name)
        modules = direction_modules(model, factors_info, icfg.include_head, model_name)
        load_rows, _, labeller = query_set(run, icfg.queries)
        start = time.perf_counter()
        p = compute_direction(model, load_rows(), query, modules, run.factors(model_name),
                              factors_info["strategy"], icfg.damping, icfg.query_batch_size,
                              factors_info.get("fitted_apart"))
        save_direction(out, p)
        write_json(out / "info.json", {"tracked_modules": modules,
                                       "strategy": factors_info["strategy"], "queries": icfg.queries,
                                       "labeller": labeller, "seconds": time.perf_counter() - start})
    log.info(f"direction {path.name}: preconditioned query gradient over {len(p)} modules "
             f"in {time.perf_counter() - start:.1f}s")
    return path


def scores(cfg: Config, run: Run, model_name: str, name: str | None = None, query: str | None = None,
           token_scores: str | None = None, normalize: str | None = None, queries: str | None = None,
           include_head: bool | None = None, part: tuple[int, int] | None = None, data: str = "full",
           force: bool = False) -> Path:
    """`ifguide scores`: P for the query set and kind, then per-token scores of every training block (or, with
    `part` = (I, N), of the I-th of N contiguous slices) in memory-mappable shards. `data` `filter` scores the
    blocklist-filtered corpus's blocks instead (named NAME-filter), for a mask stacked on the filter."""
    cfg = head_that_fits(with_overrides(cfg, "influence", token_scores=token_scores, normalize=normalize,
                                        queries=queries, include_head=include_head), run, model_name)
    icfg = cfg.influence
    query = query or icfg.query
    name = name or scores_name(icfg.queries, query, icfg.include_head, data)
    path = run.scores(model_name, name)
    # Parts share P: part 0 may rebuild it (--force), the others wait for a builder and never rebuild it.
    direction_path = query_direction(cfg, run, model_name, query, force and (part is None or part[0] == 0),
                                     wait=part is not None)
    p, direction_info = load_direction(direction_path, direction_inputs(run, model_name, icfg.queries))
    block_set, blocks_fp = training_blocks(run.require(run.data(), "run `ifguide prepare` first"), data)
    recipe = {"query": query, "queries": icfg.queries, "token_scores": icfg.token_scores, "data": data,
              "normalize": icfg.normalize, "shard_blocks": icfg.shard_blocks, "dtype": icfg.score_dtype}
    inputs = {"direction": direction_info["fingerprint"], "blocks": blocks_fp}
    read = (direction_path, run.data())
    whole = Stage(path, "scores", recipe, inputs, read)
    stage = whole if part is None else Stage(part_dir(path, part), "scores", {**recipe, "part": list(part)},
                                             inputs,
                                             read)
    if part is not None and read_info(path) is not None:
        if not force:
            raise IfguideError(f"{path} already holds scores from one process; pass --force to "
                               "replace them by parts")
        for stale in [path / INFO, *path.glob("shard_*.npy")]:
            stale.unlink(missing_ok=True)
    if stage.is_done(force):
        return stage.path
    with stage.build(resumable=True, force=force) as out:
        scorer = token_scorer(icfg.token_scores, analysis_model(run, model_name), p, icfg.normalize)
        blocks = block_array(run, block_set)
        start, stop = (0, len(blocks)) if part is None else shard_range(len(blocks), icfg.shard_blocks, part)
        label = f"scores {name}" + (f" part {part[0]}/{part[1]}" if part else "")
        journal = Journal(out / RESUME / "shards.jsonl")
        resumed = sum(shard["stop"] - shard["start"] for shard in journal.done.values())  # scored before
        if journal.done:
            log.info(f"{label}: resuming after {len(journal.done)} scored shards")
        start_time = time.perf_counter()
        shards = score_blocks(scorer, blocks, icfg.shard_blocks, icfg.train_batch_size, start, stop,
                              skip={int(first) for first in journal.done})
        info = write_shards(out, shards, blocks.shape, icfg.score_dtype, total=stop - start, desc=label,
                            journal=journal)
        elapsed = time.perf_counter() - start_time
        tokens = (stop - start - resumed) * blocks.shape[1]  # scored by this process, in `elapsed`
        write_json(out / "info.json", {**info, "query": query, "model": model_name,
                                       "blocks_fingerprint": blocks_fp,
                                       "data": data, "queries": icfg.queries,
                                       "labeller": direction_info.get("labeller"),
                                       "token_scores": icfg.token_scores, "score_s": elapsed,
                                       "blocks_range": [start, stop], "set_fingerprint": whole.fingerprint,
                                       "score_tokens_per_s": tokens / elapsed})
    log.info(f"{label}: blocks {start:,}-{stop:,} of {blocks.shape[0]:,} ({icfg.token_scores}) in "
             f"{len(info['shards'])} shards, {elapsed:.1f}s ({tokens / elapsed:,.0f} tokens/s)")
    return stage.path
