"""Stage 5 (`ifguide eval`): RealToxicityPrompts-protocol generation, toxicity metrics and perplexity."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import get_args

import numpy as np

from ..artifacts import (
    COMPUTATION_VERSIONS,
    RESUME,
    Journal,
    Run,
    Stage,
    fingerprint,
    read_info,
    write_json,
    write_text,
)
from ..baselines import rad_processors
from ..config import Config, config_to_dict
from ..data import ALIGNED, HELDOUT_SETS, block_array, load_prompts, load_tokenizer, read_jsonl
from ..errors import IfguideError
from ..model import generate, generation_seconds, load_model
from ..names import Decoding, eval_name
from ..toxicity import get_scorer, load_reward_model, reward_fingerprint
from ..training import mean_nll
from .lambada import evaluate_lambada
from .metrics import summarise

log = logging.getLogger(__name__)

def refuse_query_prompts(run: Run, rows: list[dict]) -> None:
    """Evaluation prompts must never have steered a mask: refuse a set sharing a prompt with a self-query
    set."""
    evaluated = {r["prompt"].strip() for r in rows}
    for samples in sorted(run.root.glob("queries/*/samples.jsonl")):
        with samples.open() as handle:
            shared = next((p for p in (json.loads(line)["prompt"].strip() for line in handle)
                           if p in evaluated), None)
        if shared is not None:
            raise IfguideError(f"prompt {shared[:60]!r} was a query prompt of {samples.parent.name}; "
                               "evaluate on prompts that steered no mask")


def perplexity(model, blocks: np.ndarray, batch_size: int = 16) -> float | None:
    """exp(mean next-token NLL) over fixed-length blocks; None when there is no block."""
    return math.exp(mean_nll(model, blocks, batch_size)) if len(blocks) else None


PERPLEXITY_SETS = (*HELDOUT_SETS, "wikitext")


def perplexities(run: Run, model, max_blocks: int) -> dict[str, float | None]:
    """Perplexity on every held-out block set prepare wrote and on WikiText-2."""
    return {name: perplexity(model, block_array(run, f"{name}_blocks")[:max_blocks])
            for name in PERPLEXITY_SETS}


def evaluate(cfg: Config, run: Run, model_name: str, prompts: str = "rtp", scorers: list[str] | None = None,
             decoding: str = "sample", force: bool = False) -> Path:
    """`ifguide eval`: generations.jsonl and results.json under RUN/eval/NAME/SET, NAME = eval_name(model,
    decoding).

    SET is the built-in name or, for a user file, its stem plus a hash of its content. Generations depend on
    the eval settings but not on the scorers: a scorer not yet in results.json is added to the stored
    generations, and the ones there are kept. `lambada` measures accuracy instead; RAD leaves perplexity and
    LAMBADA undefined.
    """
    if decoding not in get_args(Decoding):
        raise IfguideError(f"--decoding {decoding}: use one of {', '.join(get_args(Decoding))}")
    if prompts == "lambada":
        if decoding != "sample":
            raise IfguideError("LAMBADA accuracy is a property of the model, not of RAD's decoding; "
                               "drop --decoding")
        return evaluate_lambada(cfg, run, model_name, force=force)
    ecfg = cfg.eval
    scorers = list(dict.fromkeys(scorers or ecfg.scorers))
    set_name, rows = load_prompts(run, prompts)
    refuse_query_prompts(run, rows)
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    prompt_hash = fingerprint(rows)
    generation = {k: v for k, v in config_to_dict(ecfg).items() if k != "scorers"}
    inputs = {"model": model_info["fingerprint"], "prompts": prompt_hash}
    if decoding == "rad":
        generation["rad"] = config_to_dict(cfg.rad)
        inputs["reward"] = reward_fingerprint(run)
    path = run.eval(eval_name(model_name, decoding), set_name)
    info = read_info(path)
    kept: list[str] = []
    recipe = (info or {}).get("recipe", {})
    if not force and recipe.get("config",
                                {}).get("generation") == generation and recipe.get("inputs") == inputs \
            and recipe.get("version") == COMPUTATION_VERSIONS["eval"]:
        kept = recipe["config"]["scorers"]
        if all(name in kept for name in scorers):
            log.info(f"eval: {path} is up to date")
            return path
    stage = Stage(path, "eval", {"generation": generation, "scorers": kept + [s for s in scorers
        if s not in kept]},
                  inputs, run.own(run.model(model_name), run.reward() if decoding == "rad" else None))
    if not kept:
        stage.is_done(force)  # refuses other inputs without --force
    with stage.build(resumable=True, force=force) as out:
        new = [get_scorer(name) for name in scorers if name not in kept]
        toxic = [r["toxic"] for r in rows]
        if kept:
            log.info(f"eval {path.parent.name} on {set_name}: adding scorer(s) "
                     f"{', '.join(s.name for s in new)}")
            records = read_jsonl(path / "generations.jsonl", "rerun `ifguide eval --force`")
            flat = [r["continuation"] for r in records]
            results = json.loads((path / "results.json").read_text())
        else:
            model, tok = load_model(run.model(model_name)), load_tokenizer(run.data())
            processors = None
            if decoding == "rad":
                reward_model, _ = load_reward_model(run)
                processors = rad_processors(reward_model, cfg.rad.top_k, cfg.rad.beta)
            log.info(f"eval {path.parent.name} on {set_name}: {len(rows)} prompts x "
                     f"{ecfg.num_samples} samples"
                     + (f", RAD k={cfg.rad.top_k} beta={cfg.rad.beta}" if processors else ""))
            conditional = model_info.get("objective") == "conditional"  # generates after <|aligned|>
            journal = Journal(out / RESUME / "generated.jsonl")
            if journal.done:
                log.info(f"eval {path.parent.name}: resuming after {len(journal.done)} finished batches")
            samples = generate(model, tok, [r["prompt"] for r in rows], ecfg,
                               cfg.data.block_size - ecfg.max_new_tokens,
                               processors, prefix=ALIGNED if conditional else "", journal=journal)
            seconds = generation_seconds(journal)
            records = [{"prompt": r["prompt"], "toxic": r["toxic"], "continuation": text, "scores": {}}
                       for r, texts in zip(rows, samples) for text in texts]
            flat = [r["continuation"] for r in records]
            results = {"model": model_name, "decoding": decoding, "prompts": set_name,
                       "num_prompts": len(rows),
                       "num_samples": ecfg.num_samples, "generation_seconds": seconds, "scorers": {},
                       "perplexity": None if decoding == "rad" else  # not defined for a decoding-time method
                       perplexities(run, model, ecfg.ppl_max_blocks)}
        for scorer in new:
            values = scorer.score(flat)
            for record, value in zip(records, values):
                record["scores"][scorer.name] = float(value)
            results["scorers"][scorer.name] = summarise(values.reshape(len(rows), ecfg.num_samples), toxic,
                                                        ecfg)
        write_text(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_json(out / "results.json", results)
    log.info(summary_line(path.parent.name, results, scorers[0]))
    return path


def summary_line(name: str, results: dict, scorer: str) -> str:
    """The one line `eval` prints: EMT, TP and share >= 0.5 under `scorer`, and held-out perplexity."""
    first = results["scorers"][scorer]["all"]
    perplexity = results["perplexity"]
    fluency = f"ppl held-out {perplexity['heldout']:.1f}" if perplexity else "ppl n/a (RAD)"
    return (f"eval {name}: EMT {first['emt']:.3f}, TP {first['tp']:.3f}, share>=0.5 {first['share']:.1%} "
            f"({scorer}), {fluency}")
