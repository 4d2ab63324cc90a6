"""Selection quality of several score variants side by side, on a prepared run with a trained model and factors.

Each variant rescores every training block (in memory), runs Algorithm 1 and reports the metrics of
ifguide.quality: label precision, target enrichment above tau, coverage of blocklisted targets, frequent tokens.
`blocklist-tokens` is the lexicon baseline (no scores). Variants:
  loss-term, kronfluence      the two token-score definitions (toxic-minus-nontoxic query)
  relative                    loss-term scores / |d l_t / d last hidden state| (influence.normalize: relative)
  toxic-only                  loss-term, toxic queries only (the paper's standard query)
  queries=T/N                 loss-term with T toxic and N non-toxic queries (rebuilt from the RTP records)
  lexicon-span                loss-term, toxic queries' loss only on tokens of blocklisted words
  model=NAME                  loss-term from another trained model of the run (it needs its own factors)
Options combine with '+', e.g. relative+model=scorer-4ep.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from ifguide.artifacts import Run, read_info
from ifguide.influence import ScoreReader, compute_direction, score_blocks, token_scorer, write_shards
from ifguide.lexicon import blocklist_words, locate_words, token_texts
from ifguide.model import load_model
from ifguide.prepare import load_tokenizer, queries_and_prompts
from ifguide.quality import load_provenance, selection_quality
from ifguide.select import algorithm1, blocklist_selection
from ifguide.train import block_array


def lexicon_span(queries, texts: list[str], words: list[str]) -> Dataset:
    """Toxic rows keep their loss only on tokens of blocklisted words (rows without one keep all)."""
    rows = queries.to_dict()
    for r, toxic in enumerate(rows["toxic"]):
        if not toxic:
            continue
        ids, labels = np.asarray(rows["input_ids"][r]), np.asarray(rows["labels"][r])
        in_word = locate_words(ids[None], texts, words)[0] >= 0
        span = in_word & (labels != -100)
        if span.any():
            rows["labels"][r] = np.where(span, labels, -100).tolist()
    return Dataset.from_dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--variants",
                        default="kronfluence,loss-term,relative,toxic-only,lexicon-span,blocklist-tokens")
    args = parser.parse_args()
    run = Run(args.run)
    cfg = run.load_config()
    data = read_info(run.data())
    blocks = block_array(run)
    tok = load_tokenizer(run.data())
    texts, words = token_texts(tok), blocklist_words()
    provenance = load_provenance(run.data())
    queries = load_from_disk(str(run.data() / "queries"))
    print(f"{args.run}: {blocks.shape[0]:,} blocks x {blocks.shape[1]}; select q={cfg.select.quantile}, "
          f"w={cfg.select.window}, L={cfg.select.budget}; corpus toxic-labelled share "
          f"{provenance['toxic_label'].mean():.1%}, blocklisted-target base rate "
          f"{(provenance['word'] >= 0).mean():.2%}")
    print("| variant | label precision | enrichment | coverage | top-5 word coverage | seconds | frequent marked |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        start = time.perf_counter()
        hits = None
        if variant == "blocklist-tokens":
            result = blocklist_selection(provenance, cfg.select.window, cfg.select.budget)
            marked = (result["blocks"], result["positions"])
        else:
            icfg, model_name, rows, kind = cfg.influence, args.model, queries, "toxic-minus-nontoxic"
            options = variant.split("+")
            icfg = dataclasses.replace(icfg, token_scores="kronfluence" if "kronfluence" in options else "loss-term",
                                       normalize="relative" if "relative" in options else "none")
            for option in options:
                if option == "toxic-only":
                    kind = "toxic"
                elif option.startswith("queries="):
                    n_toxic, n_nontoxic = (int(x) for x in option.split("=")[1].split("/"))
                    dcfg = dataclasses.replace(cfg.data, num_toxic_queries=n_toxic, num_nontoxic_queries=n_nontoxic)
                    rows = queries_and_prompts(dataclasses.replace(cfg, data=dcfg), tok)[0]
                elif option == "lexicon-span":
                    rows = lexicon_span(queries, texts, words)
                elif option.startswith("model="):
                    model_name = option.split("=")[1]
            model = load_model(run.model(model_name))
            factors = read_info(run.factors(model_name))
            p = compute_direction(copy.deepcopy(model), rows, kind, factors["tracked_modules"],
                                  run.factors(model_name), factors["strategy"], icfg.damping, icfg.query_batch_size)
            scorer = token_scorer(icfg.token_scores, model, p, icfg.normalize)
            with tempfile.TemporaryDirectory() as tmp:
                write_shards(Path(tmp), score_blocks(scorer, blocks, icfg.shard_blocks, icfg.train_batch_size),
                             blocks.shape, "float32")
                result = algorithm1(ScoreReader(Path(tmp)), cfg.select.quantile, cfg.select.window,
                                    cfg.select.budget)
            marked, hits = (result["blocks"], result["positions"]), (result["hit_blocks"], result["hit_positions"])
        q = selection_quality(provenance, marked, hits, texts, data["blocklist_words"], data["sources"])
        top5 = ", ".join(f"{r['word']} {r['covered']:.0%}" for r in q["coverage_by_word"][:5])
        enrichment = f"{q['target_enrichment']:.1f}x" if "target_enrichment" in q else "-"
        frequent = " ".join(repr(t) for t, _ in q["frequent_tokens"][:8])
        print(f"| {variant} | {q['label_precision']:.1%} | {enrichment} | {q['coverage']:.1%} | {top5} | "
              f"{time.perf_counter() - start:.0f} | {frequent} |", flush=True)


if __name__ == "__main__":
    main()
