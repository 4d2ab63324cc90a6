"""The prompt sets and fixed query rows that `prepare` writes: the paper's RTP split (toxic and non-toxic
query continuations, evaluation prompts, preference prompts, all disjoint) and the BOLD, ToxiGen, AttaQ and
LAMBADA sets."""

from __future__ import annotations

import random

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import Config
from ..errors import IfguideError
from . import corpora


def _rtp_records(cfg: Config) -> list[dict]:
    if not cfg.data.hub_rtp:
        return corpora.rtp_records()
    from datasets import load_dataset

    try:
        return list(load_dataset(cfg.data.hub_rtp, split="train"))
    except Exception as exc:  # noqa: BLE001
        raise IfguideError(f"could not load '{cfg.data.hub_rtp}' from the Hub "
                           f"({type(exc).__name__})") from None


def query_rows(tok: PreTrainedTokenizerBase, examples: list[tuple[str, str, bool]], max_tokens: int) -> dict:
    """(prompt, continuation, toxic) as right-padded rows of `max_tokens`: the prompt cut from the left to
    fit, the loss on the continuation only (prompt and padding labels -100)."""
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "toxic": [], "prompt": []}
    for prompt_text, continuation, toxic in examples:
        prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        prompt = prompt[-(max_tokens - len(cont)):]
        ids = prompt + cont
        pad = max_tokens - len(ids)
        rows["input_ids"].append(ids + [tok.pad_token_id] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append([-100] * len(prompt) + cont + [-100] * pad)
        rows["toxic"].append(toxic)
        rows["prompt"].append(prompt_text)
    return rows


def queries_and_prompts(cfg: Config,
                        tok: PreTrainedTokenizerBase) -> tuple[Dataset, list[dict], list[dict], dict]:
    """RTP evaluation prompts (half toxic), then DPO preference prompts, then, from the records left, the
    toxic and non-toxic query rows: the four sets are disjoint, and evaluation prompts are set aside first, so
    the queries can take every toxic continuation that is left (the paper's query scale)."""
    d = cfg.data
    rng = random.Random(cfg.seed)
    records = [r for r in _rtp_records(cfg) if r["continuation"].get("toxicity") is not None]
    promptable = [r for r in records if r["prompt"].get("toxicity") is not None]
    prompt_toxic = [r for r in promptable if r["prompt"]["toxicity"] >= d.prompt_toxic_threshold]
    prompt_nontoxic = [r for r in promptable if r["prompt"]["toxicity"] < d.prompt_toxic_threshold]
    rtp = [{"prompt": r["prompt"]["text"], "toxic": True}
           for r in rng.sample(prompt_toxic, min(d.num_rtp_prompts_toxic, len(prompt_toxic)))]
    rtp += [{"prompt": r["prompt"]["text"], "toxic": False}
            for r in rng.sample(prompt_nontoxic, min(d.num_rtp_prompts_nontoxic, len(prompt_nontoxic)))]
    evaluated = {r["prompt"] for r in rtp}
    unused = [r for r in records if r["prompt"]["text"] not in evaluated]
    drawn = rng.sample(unused, min(d.num_dpo_prompts, len(unused)))
    preference = [{"prompt": r["prompt"]["text"]} for r in drawn]
    taken = evaluated | {r["prompt"] for r in preference}
    rest = [r for r in records if r["prompt"]["text"] not in taken]
    toxic = [r for r in rest if r["continuation"]["toxicity"] >= d.query_toxic_threshold]
    nontoxic = [r for r in rest if r["continuation"]["toxicity"] < d.query_nontoxic_threshold]
    n_toxic = d.num_toxic_queries or len(toxic)
    if len(toxic) < n_toxic or len(nontoxic) < d.num_nontoxic_queries:
        raise IfguideError(f"config: asked for {n_toxic}/{d.num_nontoxic_queries} toxic/non-toxic queries "
                           f"but only {len(toxic)}/{len(nontoxic)} RTP records outside the evaluation and "
                           "DPO prompts qualify")
    chosen = rng.sample(toxic, n_toxic)
    if d.num_nontoxic_queries:
        chosen += rng.sample(nontoxic, d.num_nontoxic_queries)
    else:  # as many as the toxic rows (or all there are), the least toxic first
        chosen += sorted(nontoxic, key=lambda r: (r["continuation"]["toxicity"],
                                                  r["prompt"]["text"]))[:n_toxic]
    rows = query_rows(tok, [(r["prompt"]["text"], r["continuation"]["text"], i < n_toxic)
                            for i, r in enumerate(chosen)], d.query_max_tokens)
    counts = {"toxic_queries": n_toxic, "nontoxic_queries": len(chosen) - n_toxic,
              "dpo_prompts": len(preference)}
    return Dataset.from_dict(rows), rtp, preference, counts


def other_prompts(cfg: Config) -> dict[str, list[dict]]:
    rng = random.Random(cfg.seed + 1)
    bold = corpora.bold_prompts()
    bold = [{"prompt": p} for p in rng.sample(bold, min(cfg.data.num_bold_prompts, len(bold)))]
    statements = corpora.toxigen_statements()
    picked = rng.sample(statements, min(cfg.data.num_toxigen_prompts, len(statements)))
    toxigen = [{"prompt": "\n".join(text.split("\n")[:3]) + "\n-", "toxic": hate} for text, hate in picked]
    attaq = corpora.attaq_questions()
    attaq = rng.sample(attaq,
                       cfg.data.num_attaq_prompts) if 0 < cfg.data.num_attaq_prompts < len(attaq) else attaq
    lambada = corpora.lambada_passages()
    lambada = lambada[: cfg.data.num_lambada or None]  # the test set in its own order: a subset is its head
    return {"bold": bold, "toxigen": toxigen, "attaq": [{"prompt": r["prompt"], "category": r["category"]}
                                                        for r in attaq],
            "lambada": [{"text": text} for text in lambada]}
