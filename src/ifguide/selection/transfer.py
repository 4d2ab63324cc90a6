"""`ifguide export-mask` and `ifguide import-mask`: a run's mask as suppressed character spans per document,
and back onto the blocks of any run, whatever its tokenizer or block size (the cross-tokenizer proxy).

Export: a marked position j of block b penalises the prediction of the next token of the training stream (b,
j+1), or (b+1, 0) after the block's last position; that token's character span in its document is exported.
Import: a token of the other run is suppressed when its character span overlaps an exported span of its
document (found by `document_id`: source, index within the source, content hash), and the position before it
in that run's stream is marked. Tokens that share a character with a suppressed token but were not marked
themselves (byte pieces of one character split across tokens) are exported as `spared`, so the same tokenizer
and blocks give back the original mask exactly.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..artifacts import Run, Stage, damaged, load_array, write_json
from ..errors import IfguideError
from .masks import MASK_FILE, save_mask
from .quality import load_provenance, selection_quality
from .spans import SpanMask, document_id, overlap_flags, piece_keys

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 4096  # blocks read at a time: memory stays bounded whatever the corpus size


def _block_columns(run: Run, columns: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first block, {column: (blocks, block_size) array}) chunk by chunk over the training blocks."""
    from ..data import load_blocks

    blocks = load_blocks(run.data())
    missing = [c for c in columns if c not in blocks.column_names]
    if missing:
        raise damaged(run.data(), "its blocks have no token offsets")
    blocks = blocks.select_columns(columns).with_format("numpy")
    for start in range(0, len(blocks), CHUNK_BLOCKS):
        rows = blocks[start: start + CHUNK_BLOCKS]
        yield start, {c: np.stack(rows[c]) if rows[c].dtype == object else np.asarray(rows[c])
                      for c in columns}


def _overlapping_tokens(run: Run, spans: dict[int, np.ndarray]
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict[int, np.ndarray]]]:
    """Chunk by chunk over the training stream: (first block, document numbers, character offsets, {document:
    indices of its tokens in the chunk that overlap its `spans`}) for the documents `spans` names."""
    documents = np.fromiter(spans, dtype=np.int64)
    for start, chunk in _block_columns(run, ["doc_ids", "char_start", "char_end"]):
        doc_ids = chunk["doc_ids"].reshape(-1)
        offsets = np.stack([chunk["char_start"].reshape(-1), chunk["char_end"].reshape(-1)], axis=1)
        overlapping = {}
        for d in np.intersect1d(np.unique(doc_ids), documents).tolist():
            where = np.flatnonzero(doc_ids == d)
            overlapping[d] = where[overlap_flags(spans[d], offsets[where])]
        yield start, doc_ids, offsets, overlapping


def _document_ids(run: Run, doc_ids: np.ndarray) -> dict[int, tuple[str, str]]:
    """Run-local document number -> (document_id, source) for the given numbers."""
    from ..data import load_documents

    # no cache file in the run
    documents = load_documents(run.data()).select(doc_ids.tolist(), keep_in_memory=True)
    return {int(d): (document_id(source, int(index), text), source) for d, source, index, text in
            zip(doc_ids, documents["source"], documents["source_index"], documents["text"])}


def export_mask(run: Run, mask: str, out: Path, force: bool = False) -> dict:
    """Write mask `mask` of `run` as a span file at `out`; returns its metadata."""
    info = run.require(run.mask(mask), f"run `ifguide select --name {mask}` first")
    run.check_output(out, "--out")
    if info.get("data", "full") != "full":
        raise IfguideError(f"mask '{mask}' indexes the filtered corpus's blocks; export-mask writes masks of "
                           "the full corpus")
    if out.exists() and not force:
        raise IfguideError(f"{out} exists; pass --force to replace it")
    marked = load_array(run.mask(mask), MASK_FILE)
    n_blocks, block = info["shape"]
    targets = np.unique(marked["blocks"].astype(np.int64) * block + marked["positions"] + 1)
    targets = targets[targets < n_blocks * block]  # the stream's very last position predicts nothing
    spans: dict[int, list[list[int]]] = {}
    for start, chunk in _block_columns(run, ["doc_ids", "char_start", "char_end"]):
        lo = start * block
        here = targets[(targets >= lo) & (targets < lo + len(chunk["doc_ids"]) * block)] - lo
        flat = {name: values.reshape(-1)[here] for name, values in chunk.items()}
        for d, s, e in zip(flat["doc_ids"].tolist(), flat["char_start"].tolist(), flat["char_end"].tolist()):
            spans.setdefault(d, []).append([s, e])
    identities = _document_ids(run, np.array(sorted(spans), dtype=np.int64))
    result = SpanMask(metadata={
        "mask": mask, "mask_fingerprint": info["fingerprint"], "method": info.get("method"),
        "scores": info.get("scores"), "queries": info.get("queries"), "labeller": info.get("labeller"),
        "blocks_fingerprint": info["blocks_fingerprint"], "marked_tokens": int(len(marked["blocks"])),
        "exported_tokens": int(len(targets)), "documents": len(spans)})
    for d, doc_spans in spans.items():
        result.add(identities[d][0], doc_spans, identities[d][1])
    for d, spared in _spared_tokens(run, block, targets, {d: result.spans[identities[d][0]]
                                                          for d in spans}).items():
        result.add(identities[d][0], [], spared=spared)
    result.metadata["exported_characters"] = int(sum(int((s[:, 1] - s[:, 0]).sum())
                                                     for s in result.spans.values()))
    result.save(out)
    log.info(f"export-mask {mask}: {len(targets):,} of {len(marked['blocks']):,} marked positions predict a "
             f"token; {result.metadata['exported_characters']:,} characters in {len(result):,} "
             f"documents -> {out}")
    return result.metadata


def _spared_tokens(run: Run, block: int, targets: np.ndarray, spans: dict[int, np.ndarray]
                   ) -> dict[int, list[tuple[int, int, int, int]]]:
    """Per document, the `spared` keys of the tokens that overlap its suppressed spans without being targets:
    byte pieces of a character whose sibling piece is marked."""
    # per document: (offsets, is target) per chunk
    overlapping: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for start, _, offsets, chunk_overlapping in _overlapping_tokens(run, spans):
        for d, where in chunk_overlapping.items():
            overlapping.setdefault(d, []).append((offsets[where], np.isin(where + start * block, targets)))
    spared = {}
    for d, parts in overlapping.items():
        keys = piece_keys(np.concatenate([offsets for offsets, _ in parts]))
        chosen = [key for key, target in zip(keys, np.concatenate([t for _, t in parts])) if not target]
        if chosen:
            spared[d] = chosen
    return spared


def match_documents(documents, spans: SpanMask) -> tuple[dict[int, str], dict[str, int]]:
    """Run-local document number -> its identity in the span file, and how many matched each way.

    A document matches its SOURCE:INDEX:HASH exactly first; the rest match by content, a file entry of the
    same source and text hash, the nearest index first (a line inserted above it moves its index, not its
    text)."""
    by_content: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for identity in spans.spans:
        source, index, digest = identity.rsplit(":", 2)
        by_content[(source, digest)].append((int(index) if index.isdigit() else -1, identity))
    local, moved = {}, []
    for start in range(0, len(documents), CHUNK_BLOCKS):
        rows = documents[start: start + CHUNK_BLOCKS]
        for i, (source, index, text) in enumerate(zip(rows["source"], rows["source_index"], rows["text"])):
            identity = document_id(source, index, text)
            if identity in spans.spans:
                local[start + i] = identity
            else:
                digest = identity.rsplit(":", 1)[1]
                if (source, digest) in by_content:
                    moved.append((start + i, index, by_content[(source, digest)]))
    exact, taken = len(local), set(local.values())
    for d, index, candidates in moved:
        free = [(abs(i - index), i, identity) for i, identity in candidates if identity not in taken]
        if free:
            local[d] = min(free)[2]
            taken.add(local[d])
    return local, {"documents_by_identity": exact, "documents_by_content": len(local) - exact}


def import_mask(run: Run, spans_path: Path, name: str, force: bool = False) -> Path:
    """RUN/masks/NAME from a span file: every position whose next token overlaps a suppressed span is
    marked."""
    from ..data import load_documents

    data_info = run.require(run.data(), "run `ifguide prepare` first")
    if not spans_path.is_file():
        raise IfguideError(f"span file {spans_path} not found")
    spans = SpanMask.load(spans_path)
    recipe = {"method": "import", "spans_metadata": spans.metadata}
    inputs = {"data": data_info["fingerprint"],
              "spans": hashlib.sha256(spans_path.read_bytes()).hexdigest()[:16]}
    stage = Stage(run.mask(name), "select", recipe, inputs, (run.data(),))
    if stage.is_done(force):
        return run.mask(name)
    with stage.build() as out:
        documents = load_documents(run.data()).select_columns(["source", "source_index", "text"])
        # run-local document number -> its identity in the file
        local, matched = match_documents(documents, spans)
        sources = set(data_info["sources"])
        unknown = Counter(source for source in (identity.rsplit(":", 2)[0] for identity in spans.spans)
                          if source not in sources)
        if unknown:
            counts = ", ".join(f"{s}: {n:,}" for s, n in unknown.most_common(5))
            log.warning(f"{sum(unknown.values()):,} documents of {spans_path.name} come from source(s) this "
                        f"run does not have ({counts}); they mark nothing")
        # intervals of the suppressed characters that are not whitespace (what must be kept)
        suppressed_chars = {}
        for start in range(0, len(documents), CHUNK_BLOCKS):
            for i, text in enumerate(documents[start: start + CHUNK_BLOCKS]["text"]):
                identity = local.get(start + i)
                if identity is None:
                    continue
                found = spans.spans[identity]
                if len(found) and found[-1, 1] > len(text) + 1:  # + 1: the end-of-text character
                    raise IfguideError(f"{spans_path}: document {identity} has a span ending at character "
                                       f"{found[-1, 1]:,}, past its end ({len(text):,} characters); the file "
                                       "does not describe this text")
                suppressed_chars[start + i] = _visible(text, found)
        found_ids = set(local.values())
        block = data_info["summary"]["block_size"]
        suppressed, kept_chars = [], 0  # stream indices of the suppressed tokens; characters they cover
        # documents with `spared` entries: decided last
        pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for start, doc_ids, offsets, overlapping in _overlapping_tokens(
                run, {d: spans.spans[identity] for d, identity in local.items()}):
            flags = np.zeros(len(doc_ids), dtype=bool)
            for d, where in overlapping.items():
                # a document may run on into the next chunk: spare its pieces at the end
                if local[d] in spans.spared:
                    pieces.setdefault(d, []).append((where + start * block, offsets[where]))
                else:
                    flags[where] = True
            suppressed.append(np.flatnonzero(flags) + start * block)
            kept_chars += _covered(offsets[flags], doc_ids[flags], suppressed_chars)
        for d, parts in pieces.items():
            stream, offsets = (np.concatenate(column) for column in zip(*parts))
            keep = np.ones(len(stream), dtype=bool)
            keep[spans.spared_tokens(local[d], offsets, np.arange(len(stream)))] = False
            suppressed.append(stream[keep])
            kept_chars += _covered(offsets[keep], np.full(int(keep.sum()), d), suppressed_chars)
        stream = np.sort(np.concatenate(suppressed)) - 1  # the position that predicts each suppressed token
        stream = stream[stream >= 0]
        blocks_, positions = stream // block, stream % block
        if not len(blocks_):
            raise IfguideError(f"no document of {spans_path} is in this run's training blocks; "
                               "nothing to mark")
        total_chars = sum(int((c[:, 1] - c[:, 0]).sum()) for c in suppressed_chars.values()) + sum(
            int((s[:, 1] - s[:, 0]).sum()) for d, s in spans.spans.items() if d not in found_ids)
        save_mask(out, blocks_, positions)
        n_blocks = int(data_info["summary"]["blocks"])
        provenance = load_provenance(run.data())
        quality = selection_quality(provenance, (blocks_, positions), None,
                                    _token_texts(run), data_info["blocklist_words"], data_info["sources"])
        transfer = {"documents_in_file": len(spans), "documents_found": len(local), **matched,
                    "documents_of_unknown_sources": sum(unknown.values()),
                    "documents_not_found_share": 1 - len(local) / max(len(spans), 1),
                    "file_exported_tokens": spans.metadata.get("exported_tokens"),
                    "marked_tokens": int(len(blocks_)),
                    "characters_in_file": total_chars, "characters_kept": int(kept_chars),
                    "characters_kept_share": kept_chars / max(total_chars, 1)}
        info = {"method": "import", "spans": str(spans_path.resolve()), "shape": [n_blocks, block],
                "marked_tokens": int(len(blocks_)), "marked_share": len(blocks_) / (n_blocks * block),
                "blocks_touched": int(len(np.unique(blocks_))),
                "blocks_fingerprint": data_info["blocks_fingerprint"],
                "quality": quality, "transfer": transfer, "queries": spans.metadata.get("queries"),
                "labeller": spans.metadata.get("labeller")}
        write_json(out / "info.json", info)
    log.info(f"import-mask {name}: {transfer['documents_found']:,} of {transfer['documents_in_file']:,} "
             f"documents found ({transfer['documents_by_identity']:,} by identity, "
             f"{transfer['documents_by_content']:,} by content; {transfer['documents_not_found_share']:.1%} "
             f"not); {transfer['marked_tokens']:,} tokens marked here against "
             f"{transfer['file_exported_tokens']} exported; {transfer['characters_kept_share']:.1%} of the "
             "suppressed characters kept")
    return run.mask(name)


def _covered(offsets: np.ndarray, doc_ids: np.ndarray, content: dict[int, np.ndarray]) -> int:
    """Suppressed non-whitespace characters (intervals per document) that the flagged tokens (offsets,
    documents) cover, each counted once."""
    return sum(_overlap(content[int(d)], _merged(offsets[doc_ids == d])) for d in np.unique(doc_ids))


NON_WHITESPACE = re.compile(r"\S+")


def _visible(text: str, spans: np.ndarray) -> np.ndarray:
    """The non-whitespace runs of `text` inside `spans`, as [start, end) intervals; the end-of-text character
    (at len(text)) counts as visible."""
    padded = text + "\x00"
    runs = [m.span() for a, b in _merged(spans).tolist() for m in NON_WHITESPACE.finditer(padded, a, b)]
    return np.array(runs, dtype=np.int64).reshape(-1, 2)


def _merged(intervals: np.ndarray) -> np.ndarray:
    """Sorted, disjoint [start, end) intervals covering the same characters as `intervals`."""
    intervals = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    intervals = intervals[np.argsort(intervals[:, 0], kind="stable")]
    if not len(intervals):
        return intervals
    reach = np.maximum.accumulate(intervals[:, 1])
    opens = np.flatnonzero(np.r_[True, intervals[1:, 0] > reach[:-1]])  # starts past every earlier end
    return np.stack([intervals[opens, 0], np.maximum.reduceat(intervals[:, 1], opens)], axis=1)


def _overlap(a: np.ndarray, b: np.ndarray) -> int:
    """The number of characters in both of two sets of sorted, disjoint intervals."""
    if not len(a) or not len(b):
        return 0
    before = np.r_[0, np.cumsum(a[:, 1] - a[:, 0])]  # characters of `a` before its interval i

    def measure_below(x: np.ndarray) -> np.ndarray:  # |a ∩ [0, x)|
        i = np.searchsorted(a[:, 0], x, side="right")
        last = np.maximum(i - 1, 0)
        inside = np.clip(np.minimum(x, a[last, 1]) - a[last, 0], 0, None)
        return np.where(i > 0, before[last] + inside, 0)

    return int((measure_below(b[:, 1]) - measure_below(b[:, 0])).sum())


def _token_texts(run: Run) -> list[str]:
    from ..data import load_tokenizer, token_texts

    return token_texts(load_tokenizer(run.data()))
