"""Stage 1 (`ifguide prepare`): corpus, tokenizer, training blocks, queries and evaluation prompts."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import corpora, lexicon
from .artifacts import Run, Stage, fingerprint, read_info, write_json, write_text
from .config import Config, config_to_dict
from .errors import IfguideError
from .sources import mirror_name, registry, source_path

EOS = "<|endoftext|>"


def load_tokenizer(data_dir: Path) -> PreTrainedTokenizerFast:
    """The run's tokenizer (pad = eos, left padding for generation)."""
    if not (data_dir / "tokenizer" / "tokenizer.json").is_file():
        raise IfguideError(f"{data_dir / 'tokenizer'} is missing; rebuild the data with `ifguide prepare --force`")
    tok = PreTrainedTokenizerFast.from_pretrained(str(data_dir / "tokenizer"))
    tok.padding_side = "left"
    return tok


def load_blocks(data_dir: Path, variant: str = "blocks") -> Dataset:
    """Training blocks (`blocks`), the blocklist-filtered corpus (`blocks_filter`) or held-out blocks."""
    path = data_dir / variant
    if not path.exists():
        raise IfguideError(f"{path} is missing; run `ifguide prepare` first")
    return load_from_disk(str(path))


def blocks_fingerprint(data_dir: Path) -> str:
    """The fingerprint tying scores and masks to one corpus of blocks."""
    info = read_info(data_dir)
    if info is None:
        raise IfguideError(f"{data_dir} is missing; run `ifguide prepare` first")
    return info["blocks_fingerprint"]


def _documents(cfg: Config) -> list[dict]:
    """Every corpus document with its source, deduplicated and shuffled with the seed."""
    docs, seen = [], set()
    for source, limit in cfg.data.sources.items():
        if source not in corpora.CORPORA:
            raise IfguideError(f"config: unknown data source '{source}' (known: {', '.join(corpora.CORPORA)})")
        texts = [(t, label) for t, label in corpora.labelled_documents(source) if t.strip()]
        random.Random(f"{cfg.seed}-{source}").shuffle(texts)
        kept = 0
        for text, label in texts:
            key = hashlib.sha1(" ".join(text.lower().split()).encode()).digest()
            if key in seen:
                continue
            seen.add(key)
            docs.append({"source": source, "text": text, "toxic_label": label})
            kept += 1
            if limit and kept >= limit:
                break
    if cfg.data.hub_corpus:
        docs += _hub_documents(cfg.data.hub_corpus, cfg.data.hub_corpus_documents)
    random.Random(cfg.seed).shuffle(docs)
    return docs


def _hub_documents(name: str, limit: int) -> list[dict]:
    """Documents streamed from the Hugging Face Hub (for online, paper-scale runs)."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - network and Hub errors come in many types
        raise IfguideError(f"could not load '{name}' from the Hugging Face Hub ({type(exc).__name__}); "
                           "this preset needs internet access") from None
    docs = []
    for row in stream:
        docs.append({"source": f"hub:{name}", "text": row["text"], "toxic_label": False})
        if limit and len(docs) >= limit:
            break
    return docs


def _train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _make_tokenizer(cfg: Config, texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    if cfg.data.tokenizer == "train":
        raw = _train_tokenizer(texts, cfg.data.vocab_size)
    else:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise IfguideError(f"config: data.tokenizer '{path}' is not a tokenizer.json file (or use 'train')")
        mirrored = mirror_name(path)
        if mirrored is not None:
            path = source_path(mirrored)  # a mirror file: its sha256 is checked
        try:
            raw = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise IfguideError(f"data.tokenizer {path} is not a readable tokenizer.json ({str(exc)[:80]})") from None
    if raw.token_to_id(EOS) is None:
        raise IfguideError(f"tokenizer {cfg.data.tokenizer} has no {EOS} token")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=None)
    tok.save_pretrained(str(out))
    return tok


def _chunk_blocks(doc_ids: list[list[int]], doc_index: list[int], sources: list[int], block: int) -> dict:
    """Concatenate documents (each ending in EOS) and cut fixed-length blocks with per-token provenance."""
    stream = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in doc_ids]) if doc_ids else np.zeros(0)
    owner = np.concatenate([np.full(len(ids), d, dtype=np.int32) for ids, d in zip(doc_ids, doc_index)])
    src = np.concatenate([np.full(len(ids), s, dtype=np.int8) for ids, s in zip(doc_ids, sources)])
    n = len(stream) // block
    shape = (n, block)
    return {
        "input_ids": stream[: n * block].reshape(shape).tolist(),
        "doc_ids": owner[: n * block].reshape(shape).tolist(),
        "source_ids": src[: n * block].reshape(shape).tolist(),
    }


def _text_blocks(tok: PreTrainedTokenizerFast, text: str, block: int) -> Dataset:
    ids = np.asarray(tok(text)["input_ids"], dtype=np.int32)
    n = len(ids) // block
    return Dataset.from_dict({"input_ids": ids[: n * block].reshape(n, block).tolist()})


def _rtp_records(cfg: Config) -> list[dict]:
    if not cfg.data.hub_rtp:
        return corpora.rtp_records()
    from datasets import load_dataset

    try:
        return list(load_dataset(cfg.data.hub_rtp, split="train"))
    except Exception as exc:  # noqa: BLE001
        raise IfguideError(f"could not load '{cfg.data.hub_rtp}' from the Hub ({type(exc).__name__})") from None


def queries_and_prompts(cfg: Config, tok: PreTrainedTokenizerFast) -> tuple[Dataset, list[dict], dict]:
    """Toxic / non-toxic query sets and, disjoint from them, RTP evaluation prompts."""
    d = cfg.data
    rng = random.Random(cfg.seed)
    records = [r for r in _rtp_records(cfg) if r["continuation"].get("toxicity") is not None]
    toxic = [r for r in records if r["continuation"]["toxicity"] >= d.query_toxic_threshold]
    nontoxic = [r for r in records if r["continuation"]["toxicity"] < d.query_nontoxic_threshold]
    if len(toxic) < d.num_toxic_queries or len(nontoxic) < d.num_nontoxic_queries:
        raise IfguideError(f"config: asked for {d.num_toxic_queries}/{d.num_nontoxic_queries} toxic/non-toxic "
                           f"queries but only {len(toxic)}/{len(nontoxic)} RTP records qualify")
    chosen = rng.sample(toxic, d.num_toxic_queries) + rng.sample(nontoxic, d.num_nontoxic_queries)
    used = {r["prompt"]["text"] for r in chosen}
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "toxic": [], "prompt": []}
    for i, r in enumerate(chosen):
        prompt = tok(r["prompt"]["text"])["input_ids"]
        cont = tok(r["continuation"]["text"])["input_ids"][: d.query_max_tokens - 1]
        prompt = prompt[-(d.query_max_tokens - len(cont)):]
        ids = prompt + cont
        pad = d.query_max_tokens - len(ids)
        rows["input_ids"].append(ids + [tok.pad_token_id] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append([-100] * len(prompt) + cont + [-100] * pad)
        rows["toxic"].append(i < d.num_toxic_queries)
        rows["prompt"].append(r["prompt"]["text"])
    rest = [r for r in records if r["prompt"]["text"] not in used and r["prompt"].get("toxicity") is not None]
    rest_toxic = [r for r in rest if r["prompt"]["toxicity"] >= d.prompt_toxic_threshold]
    rest_nontoxic = [r for r in rest if r["prompt"]["toxicity"] < d.prompt_toxic_threshold]
    rtp = [{"prompt": r["prompt"]["text"], "toxic": True}
           for r in rng.sample(rest_toxic, min(d.num_rtp_prompts_toxic, len(rest_toxic)))]
    rtp += [{"prompt": r["prompt"]["text"], "toxic": False}
            for r in rng.sample(rest_nontoxic, min(d.num_rtp_prompts_nontoxic, len(rest_nontoxic)))]
    counts = {"toxic_queries": d.num_toxic_queries, "nontoxic_queries": d.num_nontoxic_queries}
    return Dataset.from_dict(rows), rtp, counts


def _other_prompts(cfg: Config) -> dict[str, list[dict]]:
    rng = random.Random(cfg.seed + 1)
    bold = corpora.bold_prompts()
    bold = [{"prompt": p} for p in rng.sample(bold, min(cfg.data.num_bold_prompts, len(bold)))]
    statements = corpora.toxigen_statements()
    picked = rng.sample(statements, min(cfg.data.num_toxigen_prompts, len(statements)))
    toxigen = [{"prompt": "\n".join(text.split("\n")[:3]) + "\n-", "toxic": hate} for text, hate in picked]
    return {"bold": bold, "toxigen": toxigen}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def prepare(cfg: Config, run: Run, force: bool = False, fetch: bool = False) -> Path:
    """Build RUN/data; skipped when the config and the source files are unchanged."""
    used = sorted(registry())
    stage = Stage(run.data(), "prepare", {"seed": cfg.seed, "data": config_to_dict(cfg.data)},
                  {"sources": hashlib.sha256("".join(registry()[k]["sha256"] for k in used).encode()).hexdigest()})
    if stage.is_done(force):
        return run.data()
    datasets.disable_progress_bars()
    if fetch:
        for name in registry():
            source_path(name, fetch_missing=True)
    with stage.build() as out:
        docs = _documents(cfg)
        if not docs:
            raise IfguideError("config: data.sources selects no documents")
        benign = [i for i, doc in enumerate(docs) if not corpora.is_toxic_bearing(doc["source"])]
        heldout = set(benign[: int(len(benign) * cfg.data.heldout_fraction)])
        train_docs = [doc for i, doc in enumerate(docs) if i not in heldout]
        heldout_text = "\n\n".join(docs[i]["text"] for i in sorted(heldout))
        print(f"prepare: {len(train_docs)} training documents; training the tokenizer ...")
        tok = _make_tokenizer(cfg, [d["text"] for d in train_docs], out / "tokenizer")
        eos = tok.eos_token_id
        encoded = [ids + [eos] for ids in tok([d["text"] for d in train_docs])["input_ids"]]
        source_names = sorted({d["source"] for d in train_docs})
        source_index = {name: i for i, name in enumerate(source_names)}
        src_ids = [source_index[d["source"]] for d in train_docs]
        pattern = lexicon.blocklist_pattern(corpora.blocklist())
        flagged = [pattern.search(d["text"].lower()) is not None for d in train_docs]
        Dataset.from_dict({
            "doc_id": list(range(len(train_docs))),
            "source": [d["source"] for d in train_docs],
            "text": [d["text"] for d in train_docs],
            "num_tokens": [len(ids) for ids in encoded],
            "blocklisted": flagged,
            "toxic_label": [d["toxic_label"] for d in train_docs],
        }).save_to_disk(str(out / "documents"))
        block = cfg.data.block_size
        blocks = _chunk_blocks(encoded, list(range(len(encoded))), src_ids, block)
        words = lexicon.blocklist_words()
        blocks["blocklist_word"] = lexicon.locate_words(np.asarray(blocks["input_ids"]), lexicon.token_texts(tok),
                                                        words).tolist()
        Dataset.from_dict(blocks).save_to_disk(str(out / "blocks"))
        keep = [i for i, f in enumerate(flagged) if not f]
        Dataset.from_dict(_chunk_blocks([encoded[i] for i in keep], keep, [src_ids[i] for i in keep], block)
                          ).save_to_disk(str(out / "blocks_filter"))
        _text_blocks(tok, heldout_text, block).save_to_disk(str(out / "heldout_blocks"))
        _text_blocks(tok, corpora.wikitext_test(cfg.data.wikitext_chars), block).save_to_disk(
            str(out / "wikitext_blocks"))
        queries, rtp, query_counts = queries_and_prompts(cfg, tok)
        queries.save_to_disk(str(out / "queries"))
        prompt_sets = {"rtp": rtp, **_other_prompts(cfg)}
        for name, rows in prompt_sets.items():
            write_jsonl(out / "prompts" / f"{name}.jsonl", rows)
        summary = _summary(train_docs, encoded, flagged, source_names, query_counts, prompt_sets,
                           len(blocks["input_ids"]), block)
        blocks_fp = hashlib.sha256(np.asarray(blocks["input_ids"], dtype=np.int32).tobytes()).hexdigest()[:16]
        write_json(out / "info.json", {"summary": summary, "sources": source_names, "blocklist_words": words,
                                       "toxic_sources": [s for s in source_names if corpora.is_toxic_bearing(s)],
                                       "blocks_fingerprint": blocks_fp,
                                       "queries_fingerprint": fingerprint(queries.to_dict())})
    print_summary(read_info(run.data())["summary"])
    return run.data()


def _summary(docs, encoded, flagged, source_names, query_counts, prompt_sets, n_blocks, block) -> dict:
    tokens = Counter()
    documents = Counter()
    for doc, ids in zip(docs, encoded):
        tokens[doc["source"]] += len(ids)
        documents[doc["source"]] += 1
    total = sum(tokens.values())
    toxic = sum(tokens[s] for s in source_names if corpora.is_toxic_bearing(s))
    return {
        "documents": len(docs), "tokens": total, "blocks": n_blocks, "block_size": block,
        "toxic_bearing_token_share": toxic / total,
        "blocklisted_documents": int(sum(flagged)),
        "toxic_labelled_token_share": sum(len(ids) for doc, ids in zip(docs, encoded) if doc["toxic_label"]) / total,
        "per_source": {s: {"documents": documents[s], "tokens": tokens[s], "token_share": tokens[s] / total,
                           "toxic_bearing": corpora.is_toxic_bearing(s)} for s in source_names},
        **query_counts,
        "prompts": {name: {"all": len(rows), "toxic": sum(bool(r.get("toxic")) for r in rows)}
                    for name, rows in prompt_sets.items()},
    }


def print_summary(s: dict) -> None:
    print(f"prepare: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['blocks']:,} blocks of "
          f"{s['block_size']}; toxic-bearing share {s['toxic_bearing_token_share']:.1%}, toxic-labelled "
          f"{s['toxic_labelled_token_share']:.1%}; "
          f"{s['blocklisted_documents']:,} documents hit the blocklist")
    for name, row in s["per_source"].items():
        tag = "toxic-bearing" if row["toxic_bearing"] else "benign"
        print(f"  {name:22s} {row['documents']:7,} docs {row['tokens']:10,} tokens {row['token_share']:6.1%}  {tag}")
    print(f"  queries: {s['toxic_queries']} toxic, {s['nontoxic_queries']} non-toxic")
    for name, row in s["prompts"].items():
        print(f"  prompts {name}: {row['all']} ({row['toxic']} toxic)")
