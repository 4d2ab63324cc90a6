"""Reading documents: the mirror sources, corpus files and the Hub, deduplicated and appended batch by batch
to one Arrow IPC file, so memory does not grow with the corpus."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ..config import Config
from ..console import progress_bars_off
from ..errors import IfguideError
from . import corpora
from .blocks import ArrowSink

DOC_BATCH = 1000  # documents per Arrow record batch (and per tokenising task)


DOC_SCHEMA = pa.schema([("source", pa.string()), ("text", pa.string()), ("toxic_label", pa.bool_()),
                        ("source_index", pa.int64())])  # the document's place in its source's own order


def document_key(text: str) -> bytes:
    """8 bytes of SHA-1 of the text with whitespace and case folded: equal keys are duplicates."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).digest()[:8]


@dataclass
class SourceCounts:
    """Per source: documents read, kept, empty ones skipped, records cut short (`partial`) and duplicates
    dropped. `seen` holds one 8-byte key per kept document: about 100 bytes of memory each."""

    read: Counter = field(default_factory=Counter)
    partial: Counter = field(default_factory=Counter)
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
        """Add the empty, partial and duplicate counts of an earlier reading step."""
        self.empty.update(other.empty)
        self.partial.update(other.partial)
        self.duplicates.update(other.duplicates)


def toxic_bearing_sources(cfg: Config) -> set[str]:
    """Sources that carry a per-document toxic label: the mirror's toxic-bearing ones and labelled file
    inputs."""
    return {s for s in cfg.data.sources if corpora.is_toxic_bearing(s)} | {
        c.source for c in cfg.data.corpus if c.label_field}


def _is_empty(text: str) -> bool:
    return not text or text.isspace()


def _mirror_documents(cfg: Config, counts: SourceCounts) -> Iterator[tuple[str, str, bool, int]]:
    """The mirror sources' distinct documents, each source shuffled with the seed and cut to its limit, then
    all shuffled together (the mirror is small enough to hold)."""
    docs = []
    for source, limit in cfg.data.sources.items():
        if source not in corpora.CORPORA:
            raise IfguideError(f"config: unknown data source '{source}' (known: "
                               f"{', '.join(corpora.CORPORA)})")
        texts = []
        for index, item in enumerate(corpora.labelled_documents(source)):
            if item is corpora.SKIPPED:
                counts.partial[source] += 1
            else:
                texts.append((index, item))
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


def read_documents(cfg: Config, path: Path) -> tuple[int, SourceCounts]:
    """Append every document to an Arrow IPC file in batches of DOC_BATCH; returns the batch count and the
    counts of the mirror's deduplication and of empty documents."""
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
            progress.update(len(batch["text"]))  # the last, partial batch: the line ends on the true count
    sink.close()
    return sink.batches, counts


def raw_batches(path: Path | str, indices: Iterable[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of an IPC file (all, or those at `indices`), read with plain reads (no memory map:
    memory stays bounded)."""
    with pa.OSFile(str(path)) as handle:
        reader = pa.ipc.open_file(handle)
        for k in range(reader.num_record_batches) if indices is None else indices:
            yield reader.get_batch(k)
