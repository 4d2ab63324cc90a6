"""Stage 1 (`ifguide prepare`): corpus, tokenizer, training blocks, queries and evaluation prompts.

It streams, in memory that does not grow with the corpus: documents are read, deduplicated and appended to an
Arrow file batch by batch; `datasets.map(num_proc=N)` tokenises them and locates blocklisted words, each
worker reading its batches from that file; one pass then cuts the token stream into blocks (full corpus,
blocklist- filtered corpus, held-out text) and writes them with the documents table, the fingerprint and the
summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..artifacts import Run, Stage, fingerprint, read_info, write_json
from ..config import Config, config_to_dict
from ..console import progress_bars_off
from ..errors import IfguideError
from . import corpora, lexicon
from .blocks import ARROW, DOCUMENTS_SCHEMA, HELDOUT_SETS, ArrowSink, BlockCutter
from .documents import (
    DOC_SCHEMA,
    SourceCounts,
    document_key,
    raw_batches,
    read_documents,
    toxic_bearing_sources,
)
from .prompt_sets import other_prompts, queries_and_prompts
from .prompts import write_jsonl
from .sources import registry, source_path
from .tokenizer import make_tokenizer

log = logging.getLogger(__name__)

TOKENIZED = Features({"source": Value("string"), "text": Value("string"), "toxic_label": Value("bool"),
                      "source_index": Value("int64"), "key": Value("binary"), "heldout": Value("bool"),
                      "input_ids": List(Value("int32")), "blocklist_word": List(Value("int16")),
                      "char_start": List(Value("int32")), "char_end": List(Value("int32"))})


def _tokenize(rows: dict, raw: str, tok: PreTrainedTokenizerBase, locate: lexicon.WordLocator,
              heldout_fraction: float, seed: int) -> pa.Table:
    """datasets.map worker: for the documents of the listed raw batches, the token ids (+ EOS), blocklisted
    words, duplicate key, and whether the document is held out (a seeded draw over every document: the whole
    distribution, as the paper's OpenWebText test split)."""
    tables = []
    salt = str(seed).encode()
    for batch in raw_batches(raw, rows["batch"]):
        texts = batch.column("text").to_pylist()
        encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(encoding.ids + [tok.eos_token_id], dtype=np.int32) for encoding in encodings]
        # character span of each token in its document; the EOS gets the virtual character just past the text
        spans = [np.asarray(encoding.offsets + [(len(text), len(text) + 1)], dtype=np.int32).reshape(-1, 2)
                 for encoding, text in zip(encodings, texts)]
        keys = [document_key(text) for text in texts]
        draws = [int.from_bytes(hashlib.sha1(salt + key).digest()[:8], "big") / 2 ** 64 for key in keys]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int32)
        tables.append(pa.table({
            **{name: batch.column(name) for name in DOC_SCHEMA.names}, "key": pa.array(keys, pa.binary()),
            "heldout": pa.array([d < heldout_fraction for d in draws]),
            "input_ids": pa.ListArray.from_arrays(offsets, np.concatenate(ids)),
            "blocklist_word": pa.ListArray.from_arrays(offsets, np.concatenate([locate(x) for x in ids])),
            "char_start": pa.ListArray.from_arrays(offsets, np.concatenate([s[:, 0] for s in spans])),
            "char_end": pa.ListArray.from_arrays(offsets, np.concatenate([s[:, 1] for s in spans]))}))
    return pa.concat_tables(tables)


def _tokenized_batches(cfg: Config, raw: Path, n_batches: int, tok: PreTrainedTokenizerBase,
                       work: Path) -> Iterator[pa.RecordBatch]:
    """Tokenise every raw batch with datasets.map over N processes; yield the results in order."""
    locate = lexicon.WordLocator(lexicon.token_texts(tok), lexicon.blocklist_words())
    tasks = Dataset.from_dict({"batch": list(range(n_batches))})
    num_proc = min(cfg.data.num_proc or os.cpu_count() or 1, n_batches)
    kwargs = {"raw": str(raw), "tok": tok, "locate": locate, "heldout_fraction": cfg.data.heldout_fraction,
              "seed": cfg.seed}
    tokenized = tasks.map(_tokenize, batched=True, batch_size=1, num_proc=num_proc if num_proc > 1 else None,
                          remove_columns=["batch"], features=TOKENIZED, new_fingerprint="tokenize",
                          cache_file_name=str(work / "tokenized.arrow"), load_from_cache_file=False,
                          fn_kwargs=kwargs, desc="prepare: tokenising")
    for cache in tokenized.cache_files:
        with pa.OSFile(cache["filename"]) as handle:
            yield from pa.ipc.open_stream(handle)


def _flat(column: pa.ListArray) -> np.ndarray:
    return column.flatten().to_numpy(zero_copy_only=False)


def _cut_corpus(batches: Iterator[pa.RecordBatch], counts: SourceCounts, source_names: list[str], block: int,
                out: Path) -> dict:
    """One pass over the tokenised documents: duplicates dropped, then training blocks with provenance, the
    blocklist-filtered blocks, the held-out block sets and the documents table; returns the counts for the
    summary and the blocks fingerprint."""
    cutters = {"blocks": BlockCutter(out / "blocks", block),
               "blocks_filter": BlockCutter(out / "blocks_filter", block)}
    cutters |= {f"{name}_blocks": BlockCutter(out / f"{name}_blocks", block, provenance=False)
                for name in HELDOUT_SETS}
    documents = ArrowSink(out / "documents" / ARROW, DOCUMENTS_SCHEMA)
    source_index = {name: i for i, name in enumerate(source_names)}
    tokens, docs = np.zeros(len(source_names), dtype=np.int64), np.zeros(len(source_names), dtype=np.int64)
    labelled_tokens = blocklisted = blocklisted_tokens = n_docs = 0
    heldout_docs = dict.fromkeys(HELDOUT_SETS, 0)
    for batch in batches:
        new = [counts.admit(source, key) for source, key in zip(batch.column("source").to_pylist(),
                                                                 batch.column("key").to_pylist())]
        batch = batch.filter(pa.array(new))
        if not batch.num_rows:
            continue
        lengths = batch.column("input_ids").value_lengths().to_numpy()
        words = _flat(batch.column("blocklist_word"))
        # every document holds its EOS
        flagged = np.maximum.reduceat(words, np.cumsum(lengths) - lengths) >= 0
        labels = batch.column("toxic_label").to_numpy(zero_copy_only=False)
        heldout = batch.column("heldout").to_numpy(zero_copy_only=False)
        for name, keep in zip(HELDOUT_SETS, (heldout, heldout & ~labels & ~flagged, heldout & flagged)):
            if keep.any():
                kept = batch.filter(pa.array(keep)).column("input_ids")
                cutters[f"{name}_blocks"].add({"input_ids": _flat(kept)})
                heldout_docs[name] += int(keep.sum())
        train = batch.filter(pa.array(~heldout))
        if not train.num_rows:
            continue
        words = words[np.repeat(~heldout, lengths)]
        lengths, flagged, labels = lengths[~heldout], flagged[~heldout], labels[~heldout]
        doc_ids = np.arange(n_docs, n_docs + train.num_rows, dtype=np.int32)
        sources = np.array([source_index[s] for s in train.column("source").to_pylist()], dtype=np.int16)
        per_token = {"input_ids": _flat(train.column("input_ids")), "doc_ids": np.repeat(doc_ids, lengths),
                     "source_ids": np.repeat(sources, lengths), "blocklist_word": words,
                     "char_start": _flat(train.column("char_start")),
                     "char_end": _flat(train.column("char_end"))}
        cutters["blocks"].add(per_token)
        kept = np.repeat(~flagged, lengths)
        cutters["blocks_filter"].add({name: values[kept] for name, values in per_token.items()})
        documents.write({"doc_id": doc_ids, "source": train.column("source"), "text": train.column("text"),
                         "num_tokens": lengths.astype(np.int32), "blocklisted": flagged,
                         "toxic_label": labels,
                         "source_index": train.column("source_index")})
        tokens += np.bincount(sources, weights=lengths, minlength=len(source_names)).astype(np.int64)
        docs += np.bincount(sources, minlength=len(source_names))
        labelled_tokens += int(lengths[labels].sum())
        blocklisted += int(flagged.sum())
        blocklisted_tokens += int(lengths[flagged].sum())
        n_docs += train.num_rows
    documents.close()
    counts = {name: cutter.close() for name, cutter in cutters.items()}
    return {"tokens": tokens, "documents": docs, "labelled_tokens": labelled_tokens,
            "blocklisted": blocklisted,
            "blocklisted_tokens": blocklisted_tokens, "heldout_documents": heldout_docs, "blocks": counts,
            "longest_block": min(cutters["blocks"].tokens, cutters["heldout_blocks"].tokens),
            "blocks_fingerprint": cutters["blocks"].digest.hexdigest()[:16],
            "filter_blocks_fingerprint": cutters["blocks_filter"].digest.hexdigest()[:16]}


def _input_fingerprints(cfg: Config) -> dict[str, str]:
    """What prepare reads besides the config: the mirror registry, and the size and time of every corpus file
    and tokenizer file (hashing a paper-scale corpus would cost a pass of its own)."""
    used = sorted(registry())
    inputs = {"sources": hashlib.sha256("".join(registry()[k]["sha256"] for k in used).encode()).hexdigest()}
    files = []
    for spec in cfg.data.corpus:
        for path in corpora.corpus_files(spec):
            files += sorted(path.rglob("*")) if path.is_dir() else [path]
    if cfg.data.tokenizer != "train" and Path(cfg.data.tokenizer).exists():
        tokenizer = Path(cfg.data.tokenizer)
        files += sorted(tokenizer.rglob("*")) if tokenizer.is_dir() else [tokenizer]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    if stats:
        inputs["files"] = fingerprint(stats)
    return inputs


def prepare(cfg: Config, run: Run, force: bool = False, fetch: bool = False) -> Path:
    """Build RUN/data; skipped when the config and the input files are unchanged."""
    stage = Stage(run.data(), "prepare", {"seed": cfg.seed, "data": config_to_dict(cfg.data)},
                  _input_fingerprints(cfg))
    if stage.is_done(force):
        return run.data()
    if fetch:
        for name in registry():
            source_path(name, fetch_missing=True)
    with stage.build() as out:
        work = out / ".work"
        raw = work / "documents.arrow"
        clock = [time.perf_counter()]
        seconds: list[tuple[str, float]] = []

        def lap(phase: str) -> None:
            clock.append(time.perf_counter())
            seconds.append((phase, round(clock[-1] - clock[-2], 2)))

        # a given tokenizer is read first: its errors come before the corpus is read, not after
        tok = None if cfg.data.tokenizer == "train" else make_tokenizer(cfg, raw, out / "tokenizer")
        n_batches, read_counts = read_documents(cfg, raw)
        lap("read")
        if not read_counts.read:
            raise IfguideError("config: data.sources and data.corpus select no documents")
        log.info(f"prepare: {sum(read_counts.read.values()):,} documents read; "
                 + ("training the tokenizer ..." if cfg.data.tokenizer == "train" else "tokenising ..."))
        tok = tok or make_tokenizer(cfg, raw, out / "tokenizer")
        lap("tokenizer")
        source_names = sorted(read_counts.read)
        block = cfg.data.block_size
        counts = SourceCounts()
        counts.absorb(read_counts)
        cut = _cut_corpus(tqdm(_tokenized_batches(cfg, raw, n_batches, tok, work),
                               desc="prepare: cutting blocks",
                               total=n_batches, unit=" batches", disable=progress_bars_off()),
                          counts, source_names, block, out)
        if not cut["blocks"]["blocks"] or not cut["blocks"]["heldout_blocks"]:
            raise IfguideError("the corpus gives no "
                               f"{'training' if not cut['blocks']['blocks'] else 'held-out'} block of "
                               f"data.block_size={block} tokens; set data.block_size to at most "
                               f"{cut['longest_block']}, add documents or raise data.heldout_fraction")
        shutil.rmtree(work)
        lap("tokenise_and_cut")
        wikitext = BlockCutter(out / "wikitext_blocks", block, provenance=False)
        wikitext.add({"input_ids": np.asarray(tok(corpora.wikitext_test(cfg.data.wikitext_chars),
                                                  add_special_tokens=False)["input_ids"], dtype=np.int32)})
        wikitext.close()
        queries, rtp, preference, query_counts = queries_and_prompts(cfg, tok)
        queries.save_to_disk(str(out / "queries"))
        write_jsonl(out / "preference_prompts.jsonl", preference)
        prompt_sets = {"rtp": rtp, **other_prompts(cfg)}
        for name, rows in prompt_sets.items():
            write_jsonl(out / "prompts" / f"{name}.jsonl", rows)
        toxic = sorted(toxic_bearing_sources(cfg) & set(source_names))
        lap("queries_and_prompts")
        summary = {**_summary(cut, counts, source_names, toxic, query_counts, prompt_sets, block),
                   "seconds": seconds}
        for name, row in summary["per_source"].items():  # what was asked: a count, or 0 for all documents
            row["requested"] = cfg.data.sources.get(name)
        write_json(out / "info.json", {"summary": summary, "sources": source_names,
                                       "blocklist_words": lexicon.blocklist_words(), "toxic_sources": toxic,
                                       "blocks_fingerprint": cut["blocks_fingerprint"],
                                       "filter_blocks_fingerprint": cut["filter_blocks_fingerprint"],
                                       "queries_fingerprint": fingerprint(queries.to_dict())})
    print_summary(read_info(run.data())["summary"])
    return run.data()


def _summary(cut: dict, counts: SourceCounts, source_names: list[str], toxic: list[str], query_counts: dict,
             prompt_sets: dict, block: int) -> dict:
    total = int(cut["tokens"].sum())
    per_source = {s: {"documents": int(cut["documents"][i]), "tokens": int(cut["tokens"][i]),
                      "token_share": int(cut["tokens"][i]) / total, "toxic_bearing": s in toxic,
                      "empty_skipped": counts.empty[s], "empty_files": counts.empty_files[s],
                      "partial_skipped": counts.partial[s], "duplicates_dropped": counts.duplicates[s]}
                  for i, s in enumerate(source_names)}
    return {
        "documents": int(cut["documents"].sum()), "tokens": total, "blocks": cut["blocks"]["blocks"],
        "filter_blocks": cut["blocks"]["blocks_filter"], "block_size": block,
        "heldout": {name: {"documents": cut["heldout_documents"][name],
                           "blocks": cut["blocks"][f"{name}_blocks"]}
                    for name in HELDOUT_SETS},
        "toxic_bearing_token_share": sum(per_source[s]["tokens"] for s in toxic) / total,
        "blocklisted_documents": cut["blocklisted"],
        "blocklisted_token_share": cut["blocklisted_tokens"] / total,  # what the filter removes from training
        "toxic_labelled_token_share": cut["labelled_tokens"] / total,
        "empty_documents_skipped": sum(counts.empty.values()),
        "partial_records_skipped": sum(counts.partial.values()),
        "empty_files": sum(counts.empty_files.values()),
        "duplicate_documents_dropped": sum(counts.duplicates.values()),
        "per_source": per_source, **query_counts,
        "prompts": {name: {"all": len(rows), "toxic": sum(bool(r.get("toxic")) for r in rows)}
                    for name, rows in prompt_sets.items()},
    }


def print_summary(s: dict) -> None:
    held = s["heldout"]
    log.info(f"prepare: {s['documents']:,} training documents, {s['tokens']:,} tokens, {s['blocks']:,} "
             f"blocks of {s['block_size']}; {s['toxic_bearing_token_share']:.1%} from labelled sources, "
             f"{s['toxic_labelled_token_share']:.1%} labelled toxic; {s['blocklisted_documents']:,} "
             f"documents ({s['blocklisted_documents'] / s['documents']:.1%}, with "
             f"{s['blocklisted_token_share']:.1%} of the tokens) hit the blocklist; "
             f"{s['empty_documents_skipped']:,} empty and {s['duplicate_documents_dropped']:,} duplicate "
             "documents left out"
             + (f"; {s['partial_records_skipped']:,} record(s) cut short skipped"
                if s["partial_records_skipped"] else "")
             + (f"; {s['empty_files']:,} input files held no document" if s.get("empty_files") else ""))
    log.info(f"  held out: {held['heldout']['documents']:,} documents ({held['heldout']['blocks']:,} blocks) "
             f"from the whole distribution; {held['heldout_benign']['documents']:,} of them benign, "
             f"{held['heldout_blocklisted']['documents']:,} hit the blocklist")
    for name, row in s["per_source"].items():
        tag = "labelled" if row["toxic_bearing"] else "unlabelled"  # says nothing of the text itself
        requested = row.get("requested")
        asked = "" if requested is None else "  (all asked)" if requested == 0 else \
            f"  (of {requested:,} asked)"
        log.info(f"  {name:22s} {row['documents']:7,} docs {row['tokens']:10,} tokens "
                 f"{row['token_share']:6.1%}  {tag}"
                 + asked)
    log.info(f"  queries: {s['toxic_queries']} toxic, {s['nontoxic_queries']} non-toxic")
    for name, row in s["prompts"].items():
        log.info(f"  prompts {name}: {row['all']} ({row['toxic']} toxic)")
    log.debug("  seconds: " + ", ".join(f"{phase} {t:.1f}" for phase, t in s["seconds"]))
