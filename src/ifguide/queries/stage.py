"""Stage 2b (`ifguide queries`): query rows from the scoring model's own generations, labelled by a scorer.

The paper's queries are fixed RTP continuations written by other systems; toxic and non-toxic ones differ in
style as much as in toxicity, so their differential direction points partly at style. Here the scoring model
continues set-aside prompts (never evaluation prompts), a labeller scores each continuation, and samples >=
the toxic threshold become toxic rows, samples < the non-toxic threshold non-toxic rows: the direction then
points at what *this* model says when it is toxic. The labeller is recorded, so the report never headlines it
as a judge.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..artifacts import RESUME, Journal, Run, Stage, fingerprint, read_info, write_json, write_text
from ..config import Config, EvalConfig, QueriesConfig, config_to_dict
from ..errors import IfguideError

log = logging.getLogger(__name__)

BUILTIN = "rtp"  # the paper's fixed RTP continuations, built by `prepare`
REWARD_LABELLER = "reward-model"
SET_ASIDE = "set-aside"
JOINED = "+"  # query sets pooled for one direction: `rtp+self`
SET_COLUMN = "query_set"  # of pooled rows: the index of the set a row came from
ROW_COLUMNS = ["input_ids", "attention_mask", "labels", "toxic"]  # what the query gradient reads of a row
EVALUATION_SETS = ("rtp", "bold", "toxigen", "attaq")
# The eval fields that shape sampled continuations (DPO pairs and self-queries sample with the eval protocol).
SAMPLING_FIELDS = ("num_samples", "top_p", "top_k", "max_new_tokens", "temperature", "prompt_batch_size",
                   "seed")


def evaluation_prompts(run: Run) -> dict[str, set[str]]:
    """The run's evaluation prompt sets, as sets of whitespace-stripped prompt texts."""
    from ..data import read_jsonl

    return {name: {row["prompt"].strip() for row in read_jsonl(run.data() / "prompts" / f"{name}.jsonl")}
            for name in EVALUATION_SETS if (run.data() / "prompts" / f"{name}.jsonl").is_file()}


def saved_column(folder: Path, column: str) -> list:
    """One column of a dataset that `save_to_disk` wrote, read with pyarrow alone (importing datasets takes
    about a second)."""
    import pyarrow as pa

    values = []
    for shard in sorted(folder.glob("data-*.arrow")):
        with pa.OSFile(str(shard)) as handle:
            values += pa.ipc.open_stream(handle).read_all().column(column).to_pylist()
    return values


def query_prompts(run: Run, source: str) -> tuple[list[str], dict]:
    """The prompts to sample from and the record of the evaluation-overlap check; evaluation prompts are
    refused.

    `set-aside`: the prompts of the run's RTP query rows plus its preference (DPO) prompts, both disjoint from
    every evaluation prompt by construction; otherwise a JSONL file of {"prompt": str} rows.
    """
    from ..data import read_jsonl

    if source in EVALUATION_SETS:
        raise IfguideError(f"queries.prompts '{source}' is an evaluation prompt set; query prompts must "
                           "never be evaluation prompts (use set-aside or a JSONL file of other prompts)")
    if source == SET_ASIDE:
        preference = read_jsonl(run.data() / "preference_prompts.jsonl")
        prompts = list(dict.fromkeys(saved_column(run.data() / "queries", "prompt")
                                     + [r["prompt"] for r in preference]))
    else:
        from ..data import load_prompts

        prompts = list(dict.fromkeys(row["prompt"] for row in load_prompts(run, source)[1]))
    evaluation = evaluation_prompts(run)
    for name, texts in evaluation.items():
        shared = [p for p in prompts if p.strip() in texts]
        if shared:
            raise IfguideError(f"{len(shared)} query prompt(s) are {name} evaluation prompts (e.g. "
                               f"{shared[0][:60]!r}); remove them from {source}")
    check = {"overlap": 0, "evaluation_sets": {name: fingerprint(sorted(texts)) for name,
                                               texts in evaluation.items()}}
    return prompts, check


def prompt_subset(prompts: list[str], max_prompts: int, seed: int) -> list[str]:
    """A seeded subset of `max_prompts` prompts in their original order (all when 0 or when there are
    fewer)."""
    if not 0 < max_prompts < len(prompts):
        return prompts
    keep = np.random.default_rng(seed).choice(len(prompts), max_prompts, replace=False)
    return [prompts[i] for i in np.sort(keep)]


def labeller_identity(name: str, run: Run) -> str:
    """What a query set's labels depend on: the scorer's name, or the run's reward model and its
    fingerprint."""
    if name == REWARD_LABELLER:
        from ..toxicity import reward_fingerprint

        return f"{REWARD_LABELLER}:{reward_fingerprint(run)}"
    return name


def labeller(name: str, run: Run, cfg: Config, tok) -> Callable[[list[str]], np.ndarray]:
    """texts -> toxicity for a registered scorer or the run's reward model (loaded here)."""
    if name == REWARD_LABELLER:
        from ..toxicity import load_reward_model, text_toxicity

        model, _ = load_reward_model(run)

        def score(texts: list[str]) -> np.ndarray:
            ids = [x[: cfg.reward.max_tokens] for x in tok(texts, add_special_tokens=False)["input_ids"]]
            return text_toxicity(model, ids, tok.pad_token_id)

        return score
    from ..toxicity import get_scorer

    return get_scorer(name).score


def pick_rows(prompt_index: np.ndarray, toxicity: np.ndarray, empty: np.ndarray, toxic_threshold: float,
              nontoxic_threshold: float, paired: bool, max_toxic: int, max_nontoxic: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the toxic rows (score >= toxic_threshold) and non-toxic rows (< nontoxic_threshold), empty
    continuations left out; `paired` keeps prompts with both kinds; caps draw a seeded subset (0 = all)."""
    toxic = (toxicity >= toxic_threshold) & ~empty
    nontoxic = (toxicity < nontoxic_threshold) & ~empty
    if paired:
        both = np.intersect1d(prompt_index[toxic], prompt_index[nontoxic])
        keep = np.isin(prompt_index, both)
        toxic, nontoxic = toxic & keep, nontoxic & keep
    rng = np.random.default_rng(seed)

    def capped(flags: np.ndarray, cap: int) -> np.ndarray:
        rows = np.flatnonzero(flags)
        return np.sort(rng.choice(rows, cap, replace=False)) if 0 < cap < len(rows) else rows

    return capped(toxic, max_toxic), capped(nontoxic, max_nontoxic)


def query_sampling(cfg: Config, samples: int, seed: int) -> EvalConfig:
    """The evaluation protocol (top-p, new tokens, temperature) with the queries' own count, seed and batch
    size."""
    return dataclasses.replace(cfg.eval, num_samples=samples, seed=seed,
                               prompt_batch_size=cfg.queries.prompt_batch_size)


def sample_continuations(cfg: Config, model, tok, prompts: list[str], samples: int, seed: int,
                         journal: Journal | None = None) -> tuple[list[str], np.ndarray]:
    """`samples` continuations per prompt with the evaluation protocol (top-p, new tokens), seeded; flat texts
    and the prompt index of each."""
    from ..model import generate

    sampling = query_sampling(cfg, samples, seed)
    texts = generate(model, tok, prompts, sampling, cfg.data.block_size - sampling.max_new_tokens,
                     journal=journal)
    return [t for row in texts for t in row], np.repeat(np.arange(len(prompts)), samples)


def labelled_rows(tok, prompts: list[str], texts: list[str], prompt_index: np.ndarray, toxicity: np.ndarray,
                  qcfg: QueriesConfig, max_tokens: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Query rows (data.prompt_sets.query_rows) of the picked samples, toxic first, and the picked sample
    indices."""
    from ..data import query_rows

    empty = np.array([not text.strip() for text in texts], dtype=bool)
    toxic, nontoxic = pick_rows(prompt_index, toxicity, empty, qcfg.toxic_threshold, qcfg.nontoxic_threshold,
                                qcfg.paired, qcfg.max_toxic, qcfg.max_nontoxic, qcfg.seed)
    chosen = [(prompts[prompt_index[i]], texts[i], is_toxic)
              for rows, is_toxic in ((toxic, True), (nontoxic, False)) for i in rows]
    return query_rows(tok, chosen, max_tokens), toxic, nontoxic


MEANINGFUL_EPOCH_S = 60.0  # below this, a training epoch is too short next to the fixed costs to compare with


def query_cost(info: dict) -> str:
    """The queries stage's cost: seconds and samples per second, and its share of a training epoch where the
    epoch is long enough for the share to mean something."""
    text = f"{info['seconds']:.0f}s ({info['samples'] / max(info['seconds'], 1e-9):,.0f} samples/s)"
    epoch = info["epoch_fraction"] and info["seconds"] / info["epoch_fraction"]
    return text + (f", {info['epoch_fraction']:.2f} of a training epoch" if epoch
                   and epoch >= MEANINGFUL_EPOCH_S
                   else "")


def training_epoch_seconds(run: Run, model_name: str) -> float | None:
    """Seconds one training epoch of a model of this run took (None for an outside checkpoint)."""
    info = read_info(run.model(model_name)) if "/" not in model_name else None
    if not info or "train_runtime_s" not in info:
        return None
    epochs = info.get("recipe", {}).get("config", {}).get("train", {}).get("epochs") or 1.0
    return info["train_runtime_s"] / epochs


def build_queries(cfg: Config, run: Run, model_name: str, name: str, force: bool = False) -> Path:
    """`ifguide queries`: RUN/queries/NAME, query rows sampled from `model_name` and labelled (see module
    doc)."""
    qcfg = cfg.queries
    path = run.queries(name)
    model_dir = run.checkpoint(model_name, "--model")
    model_fingerprint = run.checkpoint_identity(model_dir)
    prompts, check = query_prompts(run, qcfg.prompts)
    prompts = prompt_subset(prompts, qcfg.max_prompts, qcfg.seed)
    sampling = query_sampling(cfg, qcfg.samples_per_prompt, qcfg.seed)
    # what shapes the samples
    shaping = {k: v for k, v in config_to_dict(sampling).items() if k in SAMPLING_FIELDS}
    recipe = {"queries": config_to_dict(qcfg), "sampling": shaping, "max_tokens": cfg.data.query_max_tokens,
              "evaluation_check": check}
    inputs = {"model": model_fingerprint, "prompts": fingerprint(prompts),
              "labeller": labeller_identity(qcfg.labeller, run)}
    reward = run.reward() if qcfg.labeller == REWARD_LABELLER else None
    stage = Stage(path, "queries", recipe, inputs, run.own(model_dir, run.data(), reward))
    if stage.is_done(force):
        return path
    from ..data import load_tokenizer  # heavy: after the recipe check, so a refusal comes at once
    from ..model import generation_seconds, load_model

    with stage.build(resumable=True, force=force) as out:
        log.info(f"queries {name}: {len(prompts):,} prompts x {qcfg.samples_per_prompt} samples from "
                 f"{model_name}, labelled by {qcfg.labeller}")
        tok = load_tokenizer(run.data())
        label = labeller(qcfg.labeller, run, cfg, tok)  # loaded only when the set is (re)built
        model = load_model(model_dir)
        journal = Journal(out / RESUME / "generated.jsonl")
        if journal.done:
            log.info(f"queries {name}: resuming after {len(journal.done)} finished batches")
        texts, prompt_index = sample_continuations(cfg, model, tok, prompts, qcfg.samples_per_prompt,
                                                   qcfg.seed, journal)
        generate_s = generation_seconds(journal)
        start = time.perf_counter()
        toxicity = np.asarray(label(texts), dtype=np.float64)
        label_s = time.perf_counter() - start
        rows, toxic, nontoxic = labelled_rows(tok, prompts, texts, prompt_index, toxicity, qcfg,
                                              cfg.data.query_max_tokens)
        for rows_of_kind, setting, bound in ((toxic, "toxic_threshold", "highest"),
                                             (nontoxic, "nontoxic_threshold", "lowest")):
            if not len(rows_of_kind):
                extreme = toxicity.max() if bound == "highest" else toxicity.min()
                raise IfguideError(f"queries {name}: no {setting.split('_')[0]} row: the {bound} "
                                   f"{qcfg.labeller} score of the {len(texts):,} samples is {extreme:.3f}, "
                                   f"beyond queries.{setting} ({getattr(qcfg, setting)}); move the "
                                   "threshold or sample more")
        from datasets import Dataset

        Dataset.from_dict(rows).save_to_disk(str(out / "rows"))
        kind = np.full(len(texts), "", dtype=object)
        kind[toxic], kind[nontoxic] = "toxic", "nontoxic"
        write_text(out / "samples.jsonl", "".join(
            json.dumps({"prompt": prompts[p], "continuation": t, "toxicity": float(s), "row": k or None})
            + "\n"
            for p, t, s, k in zip(prompt_index, texts, toxicity, kind)))
        epoch_s = training_epoch_seconds(run, model_name)
        seconds = generate_s + label_s
        write_json(out / "info.json", {
            "model": model_name, "labeller": qcfg.labeller, "prompts": len(prompts), "samples": len(texts),
            "toxic_rows": int(len(toxic)), "nontoxic_rows": int(len(nontoxic)),
            "empty_samples": sum(not t.strip() for t in texts),
            "mean_toxicity": float(toxicity.mean()), "generate_s": generate_s, "label_s": label_s,
            "seconds": seconds, "epoch_fraction": seconds / epoch_s if epoch_s else None})
    info = read_info(path)
    log.info(f"queries {name}: {info['toxic_rows']:,} toxic and {info['nontoxic_rows']:,} non-toxic rows of "
             f"{info['samples']:,} samples (mean {qcfg.labeller} toxicity {info['mean_toxicity']:.3f}); "
             + query_cost(info))
    return path


def query_set_names(queries: str) -> list[str]:
    """The query sets `queries` names: one, or several joined by '+' (`rtp+self`), each at most once."""
    names = queries.split(JOINED)
    if "" in [name.strip() for name in names] or len(set(names)) < len(names):
        raise IfguideError(f"query sets '{queries}': join distinct set names with '{JOINED}', e.g. rtp+self")
    return names


def query_artifacts(run: Run, queries: str) -> list[Path]:
    """The `queries` artifacts a query set reads (none for the built-in RTP rows)."""
    return [run.queries(name) for name in query_set_names(queries) if name != BUILTIN]


def query_set(run: Run, queries: str):
    """The rows of a query set: the built-in RTP rows, a `queries` artifact, or several pooled (`rtp+self`,
    each row tagged with its set in SET_COLUMN so that every set weighs the same), with its fingerprint and
    labeller."""
    from datasets import load_from_disk

    names = query_set_names(queries)
    if len(names) > 1:
        sets = [query_set(run, name) for name in names]

        def pooled():
            from datasets import concatenate_datasets

            parts = [load().select_columns(ROW_COLUMNS) for load, _, _ in sets]
            return concatenate_datasets([rows.add_column(SET_COLUMN, [k] * len(rows))
                                         for k, rows in enumerate(parts)])
        return pooled, JOINED.join(f for _, f, _ in sets), JOINED.join(labeller for _, _, labeller in sets)
    if queries == BUILTIN:
        info = run.require(run.data(), "run `ifguide prepare` first")
        rows = run.data() / "queries"
        return (lambda: load_from_disk(str(rows))), info["queries_fingerprint"], "perspective"
    info = run.require(run.queries(queries), f"run `ifguide queries --name {queries}` first")
    return (lambda: load_from_disk(str(run.queries(queries) / "rows"))), info["fingerprint"], info["labeller"]
