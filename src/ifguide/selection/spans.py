"""Masks in document coordinates: suppressed character spans per document, portable across tokenizers and
packings.

A span file is JSONL. Its first line is a header, `{"ifguide_spans": 1, "metadata": {...}}` (scoring model,
queries, the mask's fingerprint); every other line is one document, `{"doc_id": str, "source": str, "spans":
[[start, end], ...]}`, with half-open character ranges on the document's original text, sorted and merged. A
span is the text of a *predicted* token: the one whose loss term the suppression objective penalises.

Whatever the tokenizer, a token is suppressed when its character span overlaps a suppressed span; position j
of a sequence is then marked when token j+1 is (the objective's convention: position j predicts token j+1).

A document line may also hold `"spared": [[start, end, k, n], ...]`: when exactly n of the document's tokens
have the offsets [start, end) and overlap a suppressed span, the k-th of them (from 0, in document order) is
not suppressed. Byte-level BPE splits a multi-byte character into pieces that share its character span;
`spared` keeps an unmarked piece unmarked when a sibling piece is marked, so a mask comes back exactly under
the tokenizer that exported it. A tokenizer that splits the character into another number of pieces ignores
the entry.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IfguideError

FORMAT_VERSION = 1


def document_id(source: str, index: int, text: str) -> str:
    """A document's identity that outlives a run: SOURCE:INDEX:HASH (the hash of its text tells edits
    apart)."""
    return f"{source}:{index}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def merge_spans(spans: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sorted, non-empty, non-overlapping [start, end) ranges covering the same characters (touching ones
    joined)."""
    merged: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans if int(e) > int(s)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def overlap_flags(spans: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per token (start, end) offset pair, whether it overlaps any of the merged `spans`; empty tokens never
    do."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    first = np.searchsorted(spans[:, 1], starts, side="right")  # the first span ending after the token starts
    candidate = np.minimum(first, len(spans) - 1)
    return (first < len(spans)) & (spans[candidate, 0] < ends) & (ends > starts)


def piece_keys(offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(start, end, k, n) for each of the given tokens of a document, in order: the token is the k-th of the n
    given tokens whose offsets are exactly [start, end)."""
    pairs = [(int(start), int(end)) for start, end in np.asarray(offsets).reshape(-1, 2)]
    totals, seen = Counter(pairs), Counter()
    keys = []
    for pair in pairs:
        keys.append((*pair, seen[pair], totals[pair]))
        seen[pair] += 1
    return keys


MAX_OFFSET = 2**31 - 1  # character offsets are stored as int32


def _header_metadata(row: dict, where: str) -> dict:
    """The header line's metadata, checked: the format version and, when given, the document count."""
    if row["ifguide_spans"] != FORMAT_VERSION:
        raise IfguideError(f"{where}: span format {row['ifguide_spans']!r} is not {FORMAT_VERSION}")
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise IfguideError(f'{where}: the header\'s "metadata" must be an object')
    documents = metadata.get("documents")
    if documents is not None and (type(documents) is not int or documents < 0):
        raise IfguideError(f'{where}: the header\'s "documents" must be a count')
    return metadata


def _int_rows(values: object, fields: tuple[str, ...], where: str, what: str) -> list[tuple[int, ...]]:
    """A list of integer rows of len(fields), each value in 0..MAX_OFFSET; else a one-line error."""
    rows = values if isinstance(values, list) else [values]
    for item in rows:
        if not (isinstance(item, list) and len(item) == len(fields)
                and all(type(x) is int and 0 <= x <= MAX_OFFSET for x in item)):
            raise IfguideError(f"{where}: {what} must be [{', '.join(fields)}] lists of integers in "
                               f"0..{MAX_OFFSET:,} (found {str(item)[:40]})")
    return [tuple(item) for item in rows]


@dataclass
class SpanMask:
    """Suppressed character spans per document id, read from (or written to) a span file, whatever the
    tokenizer.

    `spans` maps a `document_id` to an (n, 2) array of [start, end) character offsets in the document's
    original text; `sources` maps it to its source name; `metadata` is the span file's header; `spared` lists
    pieces of split characters that stay unmarked. A token is suppressed when its character span overlaps a
    suppressed span.

        mask = SpanMask.load("mask.jsonl")         # written by `ifguide export-mask`, checked field by field
        flags = mask.token_flags(doc_id, offsets)  # one bool per token (offsets from a fast tokenizer)
        mask.add(doc_id, [(10, 17)], source="mine"); mask.save("edited.jsonl")
    """

    spans: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    spared: dict[str, set[tuple[int, int, int, int]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> SpanMask:
        """Read a span file, an untrusted input: every field is checked (types, bounds, the header's document
        count), and a malformed file is a one-line error naming the line."""
        path = Path(path)
        mask = cls()
        try:
            # a byte-order mark is not part of the JSON
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise IfguideError(f"cannot read span file {path} ({exc})") from None
        documents = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise IfguideError(f"{path}:{number} is not JSON; a span file is JSONL") from None
            where = f"{path}:{number}"
            if number == 1 and isinstance(row, dict) and "ifguide_spans" in row:
                mask.metadata = _header_metadata(row, where)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("doc_id"), str) \
                    or not isinstance(row.get("spans"), list):
                raise IfguideError(f'{where} must be an object with "doc_id" and "spans"')
            spans = _int_rows(row["spans"], ("start", "end"), where, "spans")
            spared = _int_rows(row.get("spared", []), ("start", "end", "k", "n"), where, "spared")
            if any(start >= end for start, end in spans) or any(s >= e or k >= n for s, e, k, n in spared):
                raise IfguideError(f"{where}: every span needs start < end (and every spared piece k < n)")
            source = row.get("source", "")
            if not isinstance(source, str):
                raise IfguideError(f'{where}: "source" must be a string')
            mask.add(row["doc_id"], spans, source, spared)
            documents += 1
        if not documents:
            raise IfguideError(f"span file {path} holds no document (a header at most); write one with "
                               "`ifguide export-mask`")
        expected = mask.metadata.get("documents")
        if expected is not None and expected != documents:
            raise IfguideError(f"span file {path} holds {documents:,} documents but its header lists "
                               f"{expected:,}; it was cut short or edited, export it again")
        return mask

    def add(self, doc_id: str, spans: Iterable[Sequence[int]], source: str = "",
            spared: Iterable[tuple[int, int, int, int]] = ()) -> None:
        """Suppress `spans` of document `doc_id` (merged with any it already has), sparing the `spared`
        tokens."""
        spans = [tuple(span) for span in spans]
        bad = next((span for span in spans if len(span) != 2 or not 0 <= int(span[0]) <= int(span[1])), None)
        if bad is not None:
            raise ValueError(f"SpanMask.add: span {list(bad)} of {doc_id!r} is not [start, end) with "
                             "0 <= start <= end (character offsets)")
        old = self.spans.get(doc_id, np.zeros((0, 2), dtype=np.int64)).tolist()
        self.spans[doc_id] = np.asarray(merge_spans([*old, *spans]), dtype=np.int64).reshape(-1, 2)
        self.sources.setdefault(doc_id, source)
        spared = set(spared)
        if spared:
            self.spared.setdefault(doc_id, set()).update(spared)

    def save(self, path: str | Path) -> None:
        """Write the span file atomically (header line, then one line per document with spans)."""
        from ..artifacts import write_text

        lines = [json.dumps({"ifguide_spans": FORMAT_VERSION, "metadata": self.metadata}, sort_keys=True)]
        lines += [json.dumps({"doc_id": d, "source": self.sources.get(d, ""), "spans": s.tolist(),
                              **({"spared": sorted(map(list, self.spared[d]))} if self.spared.get(d)
                                 else {})})
                  for d, s in sorted(self.spans.items()) if len(s)]
        write_text(Path(path), "\n".join(lines) + "\n")

    def token_flags(self, doc_id: str, offsets: Sequence[Sequence[int]]) -> np.ndarray:
        """Whether each of a document's tokens (by its character offsets) is suppressed; unknown documents
        have none."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 2 or offsets.shape[1] != 2 and len(offsets):
            raise ValueError(f"offsets must be (tokens, 2) [start, end] pairs, got shape {offsets.shape}; "
                             "tokenize with return_offsets_mapping=True")
        offsets = offsets.reshape(-1, 2)
        flags = overlap_flags(self.spans.get(doc_id, np.zeros((0, 2), dtype=np.int64)), offsets)
        flags[self.spared_tokens(doc_id, offsets, np.flatnonzero(flags))] = False
        return flags

    def spared_tokens(self, doc_id: str, offsets: np.ndarray, suppressed: np.ndarray) -> np.ndarray:
        """The entries of `suppressed` (indices of every token of the document that overlaps a suppressed
        span, in order) that `spared` names."""
        spared = self.spared.get(doc_id)
        if not spared:
            return suppressed[:0]
        return suppressed[[key in spared for key in piece_keys(offsets[suppressed])]]

    def suppress(self, doc_id: str, offsets: Sequence[Sequence[int]]) -> np.ndarray:
        """The `suppress` column of one sequence: position j is marked when token j+1 is suppressed."""
        flags = self.token_flags(doc_id, offsets)
        return np.concatenate([flags[1:], np.zeros(min(1, len(flags)), dtype=bool)])

    def __len__(self) -> int:
        return len(self.spans)


class SuppressionCollator:
    """An HF-style data collator: tokenized features with `input_ids`, `offset_mapping` (character offsets in
    the document's text, from a fast tokenizer with `return_offsets_mapping=True`) and `doc_id`
    (`document_id(...)`) become a right-padded batch with `attention_mask`, `labels` (-100 on padding) and the
    `suppress` column that `SuppressionTrainer` reads. `suppressed` counts the tokens it marked in the last
    batch, `suppressed_total` in all.

        collator = SuppressionCollator(SpanMask.load("mask.jsonl"), pad_token_id=tok.eos_token_id)
        feature = {"input_ids": ids, "offset_mapping": offsets, "doc_id": document_id("mine", 0, text)}
        batch = collator([feature])
    """

    def __init__(self, mask: SpanMask, pad_token_id: int):
        if not isinstance(pad_token_id, numbers.Integral) or isinstance(pad_token_id, bool):
            raise IfguideError(f"SuppressionCollator: pad_token_id is {pad_token_id!r}; pass a token id, "
                               "e.g. the tokenizer's pad_token_id or eos_token_id (set eos_token "
                               "when building it)")
        self.mask = mask
        self.pad_token_id = int(pad_token_id)
        self.suppressed = self.suppressed_total = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if not features:
            raise IfguideError("SuppressionCollator: the batch has no features; give it at least one")
        empty = next((row for row, f in enumerate(features) if not len(f.get("input_ids", [None]))), None)
        if empty is not None:
            raise IfguideError(f"SuppressionCollator: feature {empty} has no tokens; drop empty documents "
                               "before collating")
        width = max(len(f["input_ids"]) for f in features)
        batch = {name: torch.full((len(features), width), fill, dtype=dtype) for name, fill, dtype in
                 [("input_ids", self.pad_token_id, torch.long), ("attention_mask", 0, torch.long),
                  ("labels", -100, torch.long), ("suppress", False, torch.bool)]}
        for row, feature in enumerate(features):
            missing = [key for key in ("input_ids", "offset_mapping", "doc_id") if key not in feature]
            if missing:
                raise IfguideError(f"SuppressionCollator: feature {row} has no {', '.join(missing)}; "
                                   "tokenize with return_offsets_mapping=True, add doc_id, and train with "
                                   "SuppressionTrainer (a plain Trainer drops these columns unless "
                                   "remove_unused_columns=False)")
            ids, n = feature["input_ids"], len(feature["input_ids"])
            if len(feature["offset_mapping"]) != n:
                raise IfguideError(f"feature {row}: {len(feature['offset_mapping'])} offsets for {n} tokens; "
                                   "tokenize with return_offsets_mapping=True and keep them aligned")
            batch["input_ids"][row, :n] = torch.as_tensor(ids)
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(ids)
            batch["suppress"][row, :n] = torch.from_numpy(self.mask.suppress(feature["doc_id"],
                                                                             feature["offset_mapping"]))
        self.suppressed = int(batch["suppress"].sum())
        self.suppressed_total += self.suppressed
        return batch
