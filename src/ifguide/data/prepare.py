"""Stage 1 (`ifguide prepare`): corpus, tokenizer, training blocks, queries and evaluation prompts.

It streams, in memory that does not grow with the corpus: documents are read, deduplicated and appended to an
Arrow file batch by batch; `datasets.map(num_proc=N)` tokenises them and locates blocklisted words, each worker
reading its batches from that file; one pass then cuts the token stream into blocks (full corpus, blocklist-
filtered corpus, held-out text) and writes them with the documents table, the fingerprint and the summary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..artifacts import Run, Stage, fingerprint, progress_bars_off, read_info, write_json, write_text
from ..config import Config, config_to_dict
from ..errors import IfguideError
from . import corpora, lexicon
from .sources import mirror_name, registry, source_path

EOS = "<|endoftext|>"
DOC_BATCH = 1000  # documents per Arrow record batch (and per tokenising task)
ARROW = "data.arrow"
TOKEN_IDS = "input_ids.int32"  # the same token ids as a raw (n_blocks x block_size) array, for np.memmap


def load_tokenizer(data_dir: Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer (pad = eos, left padding for generation)."""
    if not (data_dir / "tokenizer" / "tokenizer_config.json").is_file():
        raise IfguideError(f"{data_dir / 'tokenizer'} is missing; rebuild the data with `ifguide prepare --force`")
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def load_blocks(data_dir: Path, variant: str = "blocks") -> Dataset:
    """Training blocks (`blocks`), the blocklist-filtered corpus (`blocks_filter`) or held-out blocks, memory-mapped."""
    path = data_dir / variant / ARROW
    if not path.is_file():
        raise IfguideError(f"{path} is missing; run `ifguide prepare` first")
    return Dataset.from_file(str(path))


def load_block_ids(data_dir: Path, variant: str = "blocks") -> np.ndarray:
    """The token ids of a block set as a read-only, memory-mapped (n_blocks, block_size) int32 array: training,
    factors and scores page them in from disk instead of holding the corpus in memory."""
    path = data_dir / variant / TOKEN_IDS
    if not path.is_file():
        raise IfguideError(f"{path} is missing; run `ifguide prepare` first (or `--force` for data of older code)")
    block = read_info(data_dir)["summary"]["block_size"]
    if not path.stat().st_size:
        return np.zeros((0, block), dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r").reshape(-1, block)


def load_documents(data_dir: Path) -> Dataset:
    """The training documents (doc_id, source, text, num_tokens, blocklisted, toxic_label), memory-mapped."""
    return load_blocks(data_dir, "documents")


def blocks_fingerprint(data_dir: Path) -> str:
    """The fingerprint tying scores and masks to one corpus of blocks."""
    info = read_info(data_dir)
    if info is None:
        raise IfguideError(f"{data_dir} is missing; run `ifguide prepare` first")
    return info["blocks_fingerprint"]


class ArrowSink:
    """Columns appended batch by batch to one Arrow file: a stream (Dataset.from_file maps it) or, with
    `random_access`, an IPC file whose batches can be read one at a time."""

    def __init__(self, path: Path, schema: pa.Schema, random_access: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.file = pa.OSFile(str(path), "wb")
        self.writer = (pa.ipc.new_file if random_access else pa.ipc.new_stream)(self.file, schema)
        self.batches = 0

    def write(self, columns: dict) -> None:
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.batches += 1

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def _lists(flat: np.ndarray, width: int) -> pa.ListArray:
    """Rows of `width` values from a flat array, as an Arrow list column."""
    offsets = np.arange(0, len(flat) + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array(flat))


class BlockCutter:
    """Concatenates documents (each ending in EOS) and writes fixed-length blocks, carrying the remainder over;
    with provenance, every token also carries its document, source and blocklisted-word ids."""

    def __init__(self, path: Path, block: int, provenance: bool = True):
        types = {"input_ids": pa.int32()}
        if provenance:
            types.update(doc_ids=pa.int32(), source_ids=pa.int16(), blocklist_word=pa.int16(), char_start=pa.int32(),
                         char_end=pa.int32())
        self.sink = ArrowSink(path / ARROW, pa.schema([(name, pa.list_(t)) for name, t in types.items()]))
        self.token_ids = open(path / TOKEN_IDS, "wb")
        self.block = block
        self.carry = {name: np.zeros(0, dtype=t.to_pandas_dtype()) for name, t in types.items()}
        self.blocks = 0
        self.digest = hashlib.sha256()

    def add(self, columns: dict[str, np.ndarray]) -> None:
        joined = {name: np.concatenate([self.carry[name], columns[name].astype(carry.dtype, copy=False)])
                  for name, carry in self.carry.items()}
        cut = len(joined["input_ids"]) // self.block * self.block
        if cut:
            self.sink.write({name: _lists(values[:cut], self.block) for name, values in joined.items()})
            token_bytes = joined["input_ids"][:cut].tobytes()
            self.digest.update(token_bytes)
            self.token_ids.write(token_bytes)
            self.blocks += cut // self.block
        self.carry = {name: values[cut:] for name, values in joined.items()}

    def close(self) -> int:
        self.sink.close()
        self.token_ids.close()
        return self.blocks


DOC_SCHEMA = pa.schema([("source", pa.string()), ("text", pa.string()), ("toxic_label", pa.bool_()),
                        ("source_index", pa.int64())])  # the document's place in its source's own order


def document_key(text: str) -> bytes:
    """8 bytes of SHA-1 of the text with whitespace and case folded: equal keys are duplicates."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).digest()[:8]


@dataclass
class SourceCounts:
    """Per source: documents read, kept, empty ones skipped and duplicates dropped. `seen` holds one 8-byte key
    per kept document: about 100 bytes of memory each."""

    read: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    empty: Counter = field(default_factory=Counter)
    empty_files: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    seen: set[bytes] = field(default_factory=set)

    def admit(self, source: str, key: bytes) -> bool:
        """Whether a document is new; duplicates are counted."""
        if key in self.seen:
            self.duplicates[source] += 1
            return False
        self.seen.add(key)
        self.kept[source] += 1
        return True

    def absorb(self, other: SourceCounts) -> None:
        """Add the empty and duplicate counts of an earlier reading step."""
        self.empty.update(other.empty)
        self.duplicates.update(other.duplicates)


def toxic_bearing_sources(cfg: Config) -> set[str]:
    """Sources that carry a per-document toxic label: the mirror's toxic-bearing ones and labelled file inputs."""
    return {s for s in cfg.data.sources if corpora.is_toxic_bearing(s)} | {
        c.source for c in cfg.data.corpus if c.label_field}


def _is_empty(text: str) -> bool:
    return not text or text.isspace()


def _mirror_documents(cfg: Config, counts: SourceCounts) -> Iterator[tuple[str, str, bool, int]]:
    """The mirror sources' distinct documents, each source shuffled with the seed and cut to its limit, then all
    shuffled together (the mirror is small enough to hold)."""
    docs = []
    for source, limit in cfg.data.sources.items():
        if source not in corpora.CORPORA:
            raise IfguideError(f"config: unknown data source '{source}' (known: {', '.join(corpora.CORPORA)})")
        texts = list(enumerate(corpora.labelled_documents(source)))
        random.Random(f"{cfg.seed}-{source}").shuffle(texts)
        for index, (text, label) in texts:
            if limit and counts.kept[source] >= limit:
                break
            if _is_empty(text):
                counts.empty[source] += 1
            elif counts.admit(source, document_key(text)):
                docs.append((source, text, label, index))
    random.Random(cfg.seed).shuffle(docs)
    yield from docs


def _hub_documents(name: str) -> Iterator[tuple[str, bool]]:
    """Documents streamed from the Hugging Face Hub (for online, paper-scale runs)."""
    from datasets import load_dataset

    try:
        for row in load_dataset(name, split="train", streaming=True):
            yield row["text"], False
    except Exception as exc:  # noqa: BLE001 - network and Hub errors come in many types
        raise IfguideError(f"could not load '{name}' from the Hugging Face Hub ({type(exc).__name__}); "
                           "this preset needs internet access") from None


def _streamed_documents(cfg: Config, counts: SourceCounts) -> Iterator[tuple[str, str, bool, int]]:
    """The non-empty documents of the data.corpus files (in file order, up to each input's limit), then of the
    Hub corpus. Duplicates among them are dropped later, by the tokenising pass."""
    inputs = [(spec.source, spec.documents, corpora.file_documents(spec, counts.empty_files))
              for spec in cfg.data.corpus]
    if cfg.data.hub_corpus:
        name = f"hub:{cfg.data.hub_corpus}"
        inputs.append((name, cfg.data.hub_corpus_documents, _hub_documents(cfg.data.hub_corpus)))
    for source, limit, documents in inputs:
        read = 0
        for index, (text, label) in enumerate(documents):
            if _is_empty(text):
                counts.empty[source] += 1
                continue
            yield source, text, label, index
            read += 1
            if read == limit:
                break


def _read_documents(cfg: Config, path: Path) -> tuple[int, SourceCounts]:
    """Append every document to an Arrow IPC file in batches of DOC_BATCH; returns the batch count and the counts
    of the mirror's deduplication and of empty documents."""
    counts = SourceCounts()
    sink = ArrowSink(path, DOC_SCHEMA, random_access=True)
    batch: dict[str, list] = {name: [] for name in DOC_SCHEMA.names}
    with tqdm(desc="prepare: reading", unit=" docs", disable=progress_bars_off()) as progress:
        for doc in itertools.chain(_mirror_documents(cfg, counts), _streamed_documents(cfg, counts)):
            counts.read[doc[0]] += 1
            for name, value in zip(DOC_SCHEMA.names, doc):
                batch[name].append(value)
            if len(batch["text"]) == DOC_BATCH:
                sink.write(batch)
                progress.update(DOC_BATCH)
                batch = {name: [] for name in batch}
        if batch["text"]:
            sink.write(batch)
    sink.close()
    return sink.batches, counts


def _raw_batches(path: Path | str, indices: Iterable[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of an IPC file (all, or those at `indices`), read with plain reads (no memory map: memory
    stays bounded)."""
    with pa.OSFile(str(path)) as handle:
        reader = pa.ipc.open_file(handle)
        for k in range(reader.num_record_batches) if indices is None else indices:
            yield reader.get_batch(k)


def _train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sample_texts(path: Path, max_chars: int) -> Iterator[str]:
    """Document texts from the start of the corpus, up to `max_chars` characters."""
    used = 0
    for batch in _raw_batches(path):
        for text in batch.column("text").to_pylist():
            yield text
            used += len(text)
            if used >= max_chars:
                return


def _make_tokenizer(cfg: Config, raw: Path, out: Path) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE, or read a tokenizer.json file or a Hugging Face tokenizer directory."""
    spec = cfg.data.tokenizer
    if spec == "train":
        fast = _train_tokenizer(_sample_texts(raw, cfg.data.tokenizer_train_chars), cfg.data.vocab_size)
    elif Path(spec).is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise IfguideError(f"data.tokenizer {spec} is not a Hugging Face tokenizer directory "
                               f"({str(exc).splitlines()[0][:100]})") from None
        if tok.eos_token_id is None:
            raise IfguideError(f"data.tokenizer {spec} has no end-of-text token (eos_token); set one in its "
                               "tokenizer_config.json")
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.save_pretrained(str(out))
        return tok
    else:
        path = Path(spec)
        if not path.is_file():
            raise IfguideError(f"config: data.tokenizer '{path}' is neither 'train', a tokenizer.json file nor a "
                               "tokenizer directory")
        mirrored = mirror_name(path)
        if mirrored is not None:
            path = source_path(mirrored)  # a mirror file: its sha256 is checked
        try:
            fast = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise IfguideError(f"data.tokenizer {path} is not a readable tokenizer.json ({str(exc)[:80]})") from None
    if fast.token_to_id(EOS) is None:
        raise IfguideError(f"tokenizer {spec} has no {EOS} token")
    tok = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=None)
    tok.save_pretrained(str(out))
    return tok


TOKENIZED = Features({"source": Value("string"), "text": Value("string"), "toxic_label": Value("bool"),
                      "source_index": Value("int64"), "key": Value("binary"), "heldout": Value("bool"),
                      "input_ids": List(Value("int32")), "blocklist_word": List(Value("int16")),
                      "char_start": List(Value("int32")), "char_end": List(Value("int32"))})


def _tokenize(rows: dict, raw: str, tok: PreTrainedTokenizerBase, locate: lexicon.WordLocator,
              heldout_fraction: float, seed: int) -> pa.Table:
    """datasets.map worker: for the documents of the listed raw batches, the token ids (+ EOS), blocklisted words,
    duplicate key, and whether the document is held out (a seeded draw among the documents not labelled toxic)."""
    tables = []
    salt = str(seed).encode()
    for batch in _raw_batches(raw, rows["batch"]):
        texts, labels = batch.column("text").to_pylist(), batch.column("toxic_label").to_pylist()
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
            "heldout": pa.array([not label and d < heldout_fraction for label, d in zip(labels, draws)]),
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


def _rtp_records(cfg: Config) -> list[dict]:
    if not cfg.data.hub_rtp:
        return corpora.rtp_records()
    from datasets import load_dataset

    try:
        return list(load_dataset(cfg.data.hub_rtp, split="train"))
    except Exception as exc:  # noqa: BLE001
        raise IfguideError(f"could not load '{cfg.data.hub_rtp}' from the Hub ({type(exc).__name__})") from None


def query_rows(tok: PreTrainedTokenizerBase, examples: list[tuple[str, str, bool]], max_tokens: int) -> dict:
    """(prompt, continuation, toxic) as right-padded rows of `max_tokens`: the prompt cut from the left to fit, the
    loss on the continuation only (prompt and padding labels -100)."""
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


def queries_and_prompts(cfg: Config, tok: PreTrainedTokenizerBase) -> tuple[Dataset, list[dict], list[dict], dict]:
    """Toxic / non-toxic query sets and, disjoint from them and from each other, RTP evaluation prompts and DPO
    preference prompts."""
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
    rows = query_rows(tok, [(r["prompt"]["text"], r["continuation"]["text"], i < d.num_toxic_queries)
                            for i, r in enumerate(chosen)], d.query_max_tokens)
    rest = [r for r in records if r["prompt"]["text"] not in used and r["prompt"].get("toxicity") is not None]
    rest_toxic = [r for r in rest if r["prompt"]["toxicity"] >= d.prompt_toxic_threshold]
    rest_nontoxic = [r for r in rest if r["prompt"]["toxicity"] < d.prompt_toxic_threshold]
    rtp = [{"prompt": r["prompt"]["text"], "toxic": True}
           for r in rng.sample(rest_toxic, min(d.num_rtp_prompts_toxic, len(rest_toxic)))]
    rtp += [{"prompt": r["prompt"]["text"], "toxic": False}
            for r in rng.sample(rest_nontoxic, min(d.num_rtp_prompts_nontoxic, len(rest_nontoxic)))]
    evaluated = {r["prompt"] for r in rtp}
    unused = [r for r in records if r["prompt"]["text"] not in used | evaluated]
    preference = [{"prompt": r["prompt"]["text"]} for r in rng.sample(unused, min(d.num_dpo_prompts, len(unused)))]
    counts = {"toxic_queries": d.num_toxic_queries, "nontoxic_queries": d.num_nontoxic_queries,
              "dpo_prompts": len(preference)}
    return Dataset.from_dict(rows), rtp, preference, counts


def _other_prompts(cfg: Config) -> dict[str, list[dict]]:
    rng = random.Random(cfg.seed + 1)
    bold = corpora.bold_prompts()
    bold = [{"prompt": p} for p in rng.sample(bold, min(cfg.data.num_bold_prompts, len(bold)))]
    statements = corpora.toxigen_statements()
    picked = rng.sample(statements, min(cfg.data.num_toxigen_prompts, len(statements)))
    toxigen = [{"prompt": "\n".join(text.split("\n")[:3]) + "\n-", "toxic": hate} for text, hate in picked]
    attaq = corpora.attaq_questions()
    attaq = rng.sample(attaq, cfg.data.num_attaq_prompts) if 0 < cfg.data.num_attaq_prompts < len(attaq) else attaq
    lambada = corpora.lambada_passages()
    lambada = lambada[: cfg.data.num_lambada or None]  # the test set in its own order: a subset is its head
    return {"bold": bold, "toxigen": toxigen, "attaq": [{"prompt": r["prompt"], "category": r["category"]}
                                                        for r in attaq],
            "lambada": [{"text": text} for text in lambada]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file that `prepare` wrote; a one-line error when an older data build lacks it."""
    if not path.is_file():
        raise IfguideError(f"{path} is missing; rebuild the data with `ifguide prepare --force`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.int32()), ("source", pa.string()), ("text", pa.string()),
                              ("num_tokens", pa.int32()), ("blocklisted", pa.bool_()), ("toxic_label", pa.bool_()),
                              ("source_index", pa.int64())])


def _cut_corpus(batches: Iterator[pa.RecordBatch], counts: SourceCounts, source_names: list[str], block: int,
                out: Path) -> dict:
    """One pass over the tokenised documents: duplicates dropped, then training blocks with provenance, the
    blocklist-filtered blocks, held-out blocks and the documents table; returns the counts for the summary and the
    blocks fingerprint."""
    cutters = {"blocks": BlockCutter(out / "blocks", block), "blocks_filter": BlockCutter(out / "blocks_filter", block),
               "heldout_blocks": BlockCutter(out / "heldout_blocks", block, provenance=False)}
    documents = ArrowSink(out / "documents" / ARROW, DOCUMENTS_SCHEMA)
    source_index = {name: i for i, name in enumerate(source_names)}
    tokens, docs = np.zeros(len(source_names), dtype=np.int64), np.zeros(len(source_names), dtype=np.int64)
    labelled_tokens = blocklisted = n_docs = 0
    for batch in batches:
        new = [counts.admit(source, key) for source, key in zip(batch.column("source").to_pylist(),
                                                                 batch.column("key").to_pylist())]
        batch = batch.filter(pa.array(new))
        heldout = batch.column("heldout").to_numpy(zero_copy_only=False)
        if heldout.any():
            cutters["heldout_blocks"].add({"input_ids": _flat(batch.filter(pa.array(heldout)).column("input_ids"))})
        train = batch.filter(pa.array(~heldout))
        if not train.num_rows:
            continue
        lengths = train.column("input_ids").value_lengths().to_numpy()
        words = _flat(train.column("blocklist_word"))
        flagged = np.maximum.reduceat(words, np.cumsum(lengths) - lengths) >= 0  # every document holds its EOS
        doc_ids = np.arange(n_docs, n_docs + train.num_rows, dtype=np.int32)
        sources = np.array([source_index[s] for s in train.column("source").to_pylist()], dtype=np.int16)
        labels = train.column("toxic_label").to_numpy(zero_copy_only=False)
        per_token = {"input_ids": _flat(train.column("input_ids")), "doc_ids": np.repeat(doc_ids, lengths),
                     "source_ids": np.repeat(sources, lengths), "blocklist_word": words,
                     "char_start": _flat(train.column("char_start")), "char_end": _flat(train.column("char_end"))}
        cutters["blocks"].add(per_token)
        kept = np.repeat(~flagged, lengths)
        cutters["blocks_filter"].add({name: values[kept] for name, values in per_token.items()})
        documents.write({"doc_id": doc_ids, "source": train.column("source"), "text": train.column("text"),
                         "num_tokens": lengths.astype(np.int32), "blocklisted": flagged, "toxic_label": labels,
                         "source_index": train.column("source_index")})
        tokens += np.bincount(sources, weights=lengths, minlength=len(source_names)).astype(np.int64)
        docs += np.bincount(sources, minlength=len(source_names))
        labelled_tokens += int(lengths[labels].sum())
        blocklisted += int(flagged.sum())
        n_docs += train.num_rows
    documents.close()
    counts = {name: cutter.close() for name, cutter in cutters.items()}
    return {"tokens": tokens, "documents": docs, "labelled_tokens": labelled_tokens, "blocklisted": blocklisted,
            "blocks": counts, "blocks_fingerprint": cutters["blocks"].digest.hexdigest()[:16]}


def _input_fingerprints(cfg: Config) -> dict[str, str]:
    """What prepare reads besides the config: the mirror registry, and the size and time of every corpus file and
    tokenizer file (hashing a paper-scale corpus would cost a pass of its own)."""
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
    if progress_bars_off():
        datasets.disable_progress_bars()
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
        tok = None if cfg.data.tokenizer == "train" else _make_tokenizer(cfg, raw, out / "tokenizer")
        n_batches, read_counts = _read_documents(cfg, raw)
        lap("read")
        if not read_counts.read:
            raise IfguideError("config: data.sources and data.corpus select no documents")
        print(f"prepare: {sum(read_counts.read.values()):,} documents read; "
              + ("training the tokenizer ..." if cfg.data.tokenizer == "train" else "tokenising ..."))
        tok = tok or _make_tokenizer(cfg, raw, out / "tokenizer")
        lap("tokenizer")
        source_names = sorted(read_counts.read)
        block = cfg.data.block_size
        counts = SourceCounts()
        counts.absorb(read_counts)
        cut = _cut_corpus(tqdm(_tokenized_batches(cfg, raw, n_batches, tok, work), desc="prepare: cutting blocks",
                               total=n_batches, unit=" batches", disable=progress_bars_off()),
                          counts, source_names, block, out)
        if not cut["blocks"]["blocks"] or not cut["blocks"]["heldout_blocks"]:
            raise IfguideError(f"the corpus gives no {'training' if not cut['blocks']['blocks'] else 'held-out'} "
                               f"block of data.block_size={block} tokens; add documents or raise "
                               "data.heldout_fraction")
        shutil.rmtree(work)
        lap("tokenise_and_cut")
        wikitext = BlockCutter(out / "wikitext_blocks", block, provenance=False)
        wikitext.add({"input_ids": np.asarray(tok(corpora.wikitext_test(cfg.data.wikitext_chars),
                                                  add_special_tokens=False)["input_ids"], dtype=np.int32)})
        wikitext.close()
        queries, rtp, preference, query_counts = queries_and_prompts(cfg, tok)
        queries.save_to_disk(str(out / "queries"))
        write_jsonl(out / "preference_prompts.jsonl", preference)
        prompt_sets = {"rtp": rtp, **_other_prompts(cfg)}
        for name, rows in prompt_sets.items():
            write_jsonl(out / "prompts" / f"{name}.jsonl", rows)
        toxic = sorted(toxic_bearing_sources(cfg) & set(source_names))
        lap("queries_and_prompts")
        summary = {**_summary(cut, counts, source_names, toxic, query_counts, prompt_sets, block), "seconds": seconds}
        write_json(out / "info.json", {"summary": summary, "sources": source_names,
                                       "blocklist_words": lexicon.blocklist_words(), "toxic_sources": toxic,
                                       "blocks_fingerprint": cut["blocks_fingerprint"],
                                       "queries_fingerprint": fingerprint(queries.to_dict())})
    print_summary(read_info(run.data())["summary"])
    return run.data()


def _summary(cut: dict, counts: SourceCounts, source_names: list[str], toxic: list[str], query_counts: dict,
             prompt_sets: dict, block: int) -> dict:
    total = int(cut["tokens"].sum())
    per_source = {s: {"documents": int(cut["documents"][i]), "tokens": int(cut["tokens"][i]),
                      "token_share": int(cut["tokens"][i]) / total, "toxic_bearing": s in toxic,
                      "empty_skipped": counts.empty[s], "empty_files": counts.empty_files[s],
                      "duplicates_dropped": counts.duplicates[s]}
                  for i, s in enumerate(source_names)}
    return {
        "documents": int(cut["documents"].sum()), "tokens": total, "blocks": cut["blocks"]["blocks"],
        "filter_blocks": cut["blocks"]["blocks_filter"], "heldout_blocks": cut["blocks"]["heldout_blocks"],
        "block_size": block,
        "toxic_bearing_token_share": sum(per_source[s]["tokens"] for s in toxic) / total,
        "blocklisted_documents": cut["blocklisted"],
        "toxic_labelled_token_share": cut["labelled_tokens"] / total,
        "empty_documents_skipped": sum(counts.empty.values()),
        "empty_files": sum(counts.empty_files.values()),
        "duplicate_documents_dropped": sum(counts.duplicates.values()),
        "per_source": per_source, **query_counts,
        "prompts": {name: {"all": len(rows), "toxic": sum(bool(r.get("toxic")) for r in rows)}
                    for name, rows in prompt_sets.items()},
    }


def print_summary(s: dict) -> None:
    print(f"prepare: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['blocks']:,} blocks of "
          f"{s['block_size']}; toxic-bearing share {s['toxic_bearing_token_share']:.1%}, toxic-labelled "
          f"{s['toxic_labelled_token_share']:.1%}; "
          f"{s['blocklisted_documents']:,} documents hit the blocklist; {s['empty_documents_skipped']:,} empty and "
          f"{s['duplicate_documents_dropped']:,} duplicate documents left out"
          + (f"; {s['empty_files']:,} input files held no document" if s.get("empty_files") else ""))
    for name, row in s["per_source"].items():
        tag = "toxic-bearing" if row["toxic_bearing"] else "benign"
        print(f"  {name:22s} {row['documents']:7,} docs {row['tokens']:10,} tokens {row['token_share']:6.1%}  {tag}")
    print(f"  queries: {s['toxic_queries']} toxic, {s['nontoxic_queries']} non-toxic")
    for name, row in s["prompts"].items():
        print(f"  prompts {name}: {row['all']} ({row['toxic']} toxic)")
    print("  seconds: " + ", ".join(f"{phase} {t:.1f}" for phase, t in s["seconds"]))
