"""Selection quality of several score variants side by side, on a prepared run with a trained model and
factors.

Each variant rescores every training block (in memory), runs Algorithm 1 and reports the metrics of
ifguide.selection.quality: label precision, target enrichment above tau, coverage of blocklisted targets,
frequent tokens.
`blocklist-tokens` is the lexicon baseline (no scores). Variants:
  loss-term, kronfluence      the two token-score definitions (toxic-minus-nontoxic query)
  relative                    loss-term scores / |d l_t / d last hidden state| (influence.normalize: relative)
  toxic-only                  loss-term, toxic queries only (the paper's standard query)
  queries=T/N                 loss-term with T toxic and N non-toxic queries (rebuilt from the RTP records)
  lexicon-span                loss-term, toxic queries' loss only on tokens of blocklisted words
  model=NAME                  loss-term from another trained model of the run (it needs its own factors)
  head                        the LM head tracked too (factors refitted with it into a temporary folder)
  self                        self-generated queries (ifguide queries) from the scoring model, with
                              sub-options samples=N, labeller=NAME, tox=X, non=Y, paired, cap=T/N
                              (queries.* settings)
  iter=MODEL                  with self: one iterative round, MODEL's still-toxic samples added as toxic rows
Options combine with '+', e.g. relative+model=scorer-4ep or self+samples=16+labeller=jigsaw-lstm+head.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from ifguide.artifacts import Run, read_info
from ifguide.data.blocks import block_array
from ifguide.data.lexicon import blocklist_words, locate_words, token_texts
from ifguide.data.prompt_sets import queries_and_prompts
from ifguide.data.tokenizer import load_tokenizer
from ifguide.influence import (
    ScoreReader,
    compute_direction,
    fit_factors,
    score_blocks,
    token_scorer,
    write_shards,
)
from ifguide.influence.stage import direction_modules
from ifguide.model import load_model
from ifguide.queries.stage import (
    SET_ASIDE,
    labelled_rows,
    labeller,
    query_prompts,
    sample_continuations,
    training_epoch_seconds,
)
from ifguide.selection.algorithm1 import algorithm1
from ifguide.selection.quality import load_provenance, selection_quality
from ifguide.selection.stage import blocklist_selection


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


class SelfQueries:
    """Self-generated query rows for the `self` variants; samples and labels cached per model, count and
    labeller."""

    def __init__(self, run: Run, cfg, tok):
        self.run, self.cfg, self.tok = run, cfg, tok
        self.prompts, _ = query_prompts(run, SET_ASIDE)
        self.samples: dict = {}
        self.labels: dict = {}
        self.labellers: dict = {}

    def sampled(self, model_name: str, n: int) -> tuple[list[str], np.ndarray]:
        if (model_name, n) not in self.samples:
            start = time.perf_counter()
            model = load_model(self.run.model(model_name))
            self.samples[model_name, n] = sample_continuations(self.cfg, model, self.tok, self.prompts, n,
                                                               self.cfg.queries.seed)
            seconds = time.perf_counter() - start
            epoch = training_epoch_seconds(self.run, model_name)
            print(f"# sampled {len(self.prompts)} x {n} from {model_name} in {seconds:.0f}s"
                  + (f" ({seconds / epoch:.2f} of its training epoch)" if epoch else ""), flush=True)
        return self.samples[model_name, n]

    def toxicity(self, model_name: str, n: int, name: str) -> np.ndarray:
        if (model_name, n, name) not in self.labels:
            if name not in self.labellers:
                self.labellers[name] = labeller(name, self.run, self.cfg, self.tok)
            start = time.perf_counter()
            texts = self.sampled(model_name, n)[0]
            self.labels[model_name, n, name] = np.asarray(self.labellers[name](texts))
            print(f"# labelled with {name} in {time.perf_counter() - start:.0f}s", flush=True)
        return self.labels[model_name, n, name]

    def rows(self, model_name: str, options: list[str]) -> Dataset:
        settings = dict(option.split("=", 1) for option in options if "=" in option)
        qcfg = dataclasses.replace(
            self.cfg.queries, samples_per_prompt=int(settings.get("samples",
                                                                  self.cfg.queries.samples_per_prompt)),
            labeller=settings.get("labeller", self.cfg.queries.labeller),
            toxic_threshold=float(settings.get("tox", self.cfg.queries.toxic_threshold)),
            nontoxic_threshold=float(settings.get("non", self.cfg.queries.nontoxic_threshold)),
            paired="paired" in options)
        if "cap" in settings:
            cap_toxic, cap_nontoxic = (int(x) for x in settings["cap"].split("/"))
            qcfg = dataclasses.replace(qcfg, max_toxic=cap_toxic, max_nontoxic=cap_nontoxic)
        n = qcfg.samples_per_prompt
        texts, index = self.sampled(model_name, n)
        rows, toxic, nontoxic = labelled_rows(self.tok, self.prompts, texts, index,
                                              self.toxicity(model_name, n, qcfg.labeller), qcfg,
                                              self.cfg.data.query_max_tokens)
        line = f"# rows: {len(toxic)} toxic, {len(nontoxic)} non-toxic"
        if "iter" in settings:  # one round: the IF-Guide model's still-toxic samples join as toxic rows
            texts, index = self.sampled(settings["iter"], n)
            extra, more, _ = labelled_rows(self.tok, self.prompts, texts, index,
                                           self.toxicity(settings["iter"], n, qcfg.labeller),
                                           dataclasses.replace(qcfg, paired=False, nontoxic_threshold=0.0),
                                           self.cfg.data.query_max_tokens)
            rows = {k: v[: len(toxic)] + extra[k] + v[len(toxic):] for k, v in rows.items()}
            line += f", plus {len(more)} toxic from {settings['iter']}"
        print(line, flush=True)
        return Dataset.from_dict(rows)


def head_factors(run: Run, model_name: str, icfg, blocks: np.ndarray, work: Path) -> tuple[Path, dict]:
    """Factors of the run's model refitted with the LM head tracked, into `work` (cached there)."""
    out = work / f"head-{model_name}"
    if not out.exists():
        head_cfg = dataclasses.replace(icfg, include_head=True)
        info = fit_factors(load_model(run.model(model_name)), blocks, head_cfg, out, run.load_config().seed)
        (out / "factors.json").write_text(json.dumps(info))
    return out, json.loads((out / "factors.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print("| variant | label precision | enrichment | coverage | top-5 word coverage | seconds | "
          "frequent marked |")
    print("|---|---|---|---|---|---|---|")
    self_queries = None
    work = Path(tempfile.mkdtemp(prefix="bench-selection-"))
    for variant in args.variants.split(","):
        start = time.perf_counter()
        hits = None
        if variant == "blocklist-tokens":
            result = blocklist_selection(provenance, cfg.select.window, cfg.select.budget)
            marked = (result["blocks"], result["positions"])
        else:
            icfg, model_name, rows, kind = cfg.influence, args.model, queries, "toxic-minus-nontoxic"
            options = variant.split("+")
            icfg = dataclasses.replace(icfg, token_scores="kronfluence" if "kronfluence" in options
                                       else "loss-term",
                                       normalize="relative" if "relative" in options else "none")
            for option in options:
                if option == "self":
                    if self_queries is None:
                        self_queries = SelfQueries(run, cfg, tok)
                    rows = self_queries.rows(args.model, options)
                elif option == "toxic-only":
                    kind = "toxic"
                elif option.startswith("queries="):
                    n_toxic, n_nontoxic = (int(x) for x in option.split("=")[1].split("/"))
                    dcfg = dataclasses.replace(cfg.data, num_toxic_queries=n_toxic,
                                               num_nontoxic_queries=n_nontoxic)
                    rows = queries_and_prompts(dataclasses.replace(cfg, data=dcfg), tok)[0]
                elif option == "lexicon-span":
                    rows = lexicon_span(queries, texts, words)
                elif option.startswith("model="):
                    model_name = option.split("=")[1]
            model = load_model(run.model(model_name))
            factors_root, factors = run.factors(model_name), read_info(run.factors(model_name))
            if "head" in options:
                factors_root, factors = head_factors(run, model_name, icfg, blocks, work)
            modules = direction_modules(model, factors, "head" in options, model_name)  # head only if asked
            p = compute_direction(copy.deepcopy(model), rows, kind, modules,
                                  factors_root, factors["strategy"], icfg.damping, icfg.query_batch_size)
            scorer = token_scorer(icfg.token_scores, model, p, icfg.normalize)
            with tempfile.TemporaryDirectory() as tmp:
                write_shards(Path(tmp), score_blocks(scorer, blocks, icfg.shard_blocks,
                                                     icfg.train_batch_size),
                             blocks.shape, "float32")
                result = algorithm1(ScoreReader(Path(tmp)), cfg.select.quantile, cfg.select.window,
                                    cfg.select.budget)
            marked, hits = (result["blocks"], result["positions"]), (result["hit_blocks"],
                                                                     result["hit_positions"])
        q = selection_quality(provenance, marked, hits, texts, data["blocklist_words"], data["sources"])
        top5 = ", ".join(f"{r['word']} {r['covered']:.0%}" for r in q["coverage_by_word"][:5])
        enrichment = f"{q['target_enrichment']:.1f}x" if "target_enrichment" in q else "-"
        frequent = " ".join(repr(t) for t, _ in q["frequent_tokens"][:8])
        print(f"| {variant} | {q['label_precision']:.1%} | {enrichment} | {q['coverage']:.1%} | {top5} | "
              f"{time.perf_counter() - start:.0f} | {frequent} |", flush=True)


if __name__ == "__main__":
    main()
