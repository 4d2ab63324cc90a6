"""Masks carried between runs as character spans: exact round trip, other block sizes, other tokenizers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from ifguide.artifacts import Run, read_info
from ifguide.cli import main, rebuild_command
from ifguide.config import config_to_dict, load_config
from ifguide.data.blocks import load_blocks, load_documents
from ifguide.selection.spans import SpanMask, document_id
from tests.helpers import fake_scores


@pytest.fixture
def run_copy(quick_run, tmp_path) -> Run:
    shutil.copytree(quick_run.root, tmp_path / "run")
    return Run(tmp_path / "run")


def marked(run: Run, mask: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(run.mask(mask) / "marked.npz") as sparse:
        return sparse["blocks"], sparse["positions"]


def stream_tokens(run: Run) -> list[tuple[str, int, int]]:
    """(document id, char start, char end) of every token of the training stream, in order."""
    blocks = load_blocks(run.data()).with_format("numpy")
    flat = {c: np.concatenate(list(blocks[c])) for c in ("doc_ids", "char_start", "char_end")}
    docs = load_documents(run.data())
    ids = [document_id(s, i, t) for s, i, t in zip(docs["source"], docs["source_index"], docs["text"])]
    return [(ids[d], int(a), int(b)) for d, a, b in zip(flat["doc_ids"], flat["char_start"],
                                                        flat["char_end"])]


def predicted_tokens(run: Run, mask: str) -> set[tuple[str, int, int]]:
    """The tokens the marked positions predict (the next token of the stream)."""
    tokens = stream_tokens(run)
    b, p = marked(run, mask)
    block = read_info(run.data())["summary"]["block_size"]
    return {tokens[t] for t in b.astype(np.int64) * block + p + 1 if t < len(tokens)}


def prepare_variant(tmp_path, name: str, **data) -> Run:
    config = config_to_dict(load_config("quick"))
    config["data"].update(data)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    run = Run(tmp_path / name)
    assert main(["prepare", "--config", str(tmp_path / f"{name}.yaml"), "--run", str(run.root)]) == 0
    return run


def test_export_then_import_gives_back_the_mask_exactly(run_copy, tmp_path):
    r = ["--run", str(run_copy.root)]
    # random scores: marks anywhere, the blocks' last positions and end-of-text tokens too
    fake_scores(run_copy)
    assert main(["select", *r, "--scores", "baseline/s", "--name", "random", "--budget", "0.05"]) == 0
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    for mask in ("random", "words"):
        out = tmp_path / f"{mask}.jsonl"
        assert main(["export-mask", *r, "--mask", mask, "--out", str(out)]) == 0
        assert main(["import-mask", *r, "--spans", str(out), "--name", f"{mask}-back"]) == 0
        original, back = marked(run_copy, mask), marked(run_copy, f"{mask}-back")
        # the stream's very last position predicts no token, so no span can bring it back
        if mask == "random":
            n_blocks, block = read_info(run_copy.mask(mask))["shape"]
            keep = original[0].astype(np.int64) * block + original[1] < n_blocks * block - 1
            original = tuple(column[keep] for column in original)
        # bit-identical, byte pieces of split characters included
        for column, column_back in zip(original, back):
            assert column.dtype == column_back.dtype and np.array_equal(column, column_back)
        header = json.loads(out.read_text().splitlines()[0])["metadata"]
        assert header["mask"] == mask
        assert header["mask_fingerprint"] == read_info(run_copy.mask(mask))["fingerprint"]
        # a damaged mask names the command that rebuilds it: import-mask from its span file, or select
        assert rebuild_command(run_copy.mask(f"{mask}-back")) == (
            f"ifguide import-mask --run {run_copy.root} --spans {out} --name {mask}-back --force")
        rebuild = rebuild_command(run_copy.mask(mask))  # with the method and scores the mask recorded
        assert rebuild.startswith(f"ifguide select --run {run_copy.root} --name {mask} --method "
                                  f"{'paper' if mask == 'random' else 'blocklist-tokens'} --budget ")
        assert ("--scores baseline/s --force" in rebuild) == (mask == "random")
        assert rebuild.endswith(" --force")
        # the random mask splits characters: some byte pieces are marked, their siblings not
        if mask == "random":
            assert sum(len(line.get("spared", [])) for line in map(json.loads,
                                                                   out.read_text().splitlines()[1:])) > 0
        transfer = read_info(run_copy.mask(f"{mask}-back"))["transfer"]
        assert transfer["documents_not_found_share"] == 0 and transfer["characters_kept_share"] == 1.0
    # no overwrite
    assert main(["export-mask", *r, "--mask", "words", "--out", str(tmp_path / "words.jsonl")]) == 2


def test_another_block_size_marks_the_same_document_tokens(run_copy, tmp_path):
    r = ["--run", str(run_copy.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    assert main(["export-mask", *r, "--mask", "words", "--out", str(tmp_path / "w.jsonl")]) == 0
    other = prepare_variant(tmp_path, "b32", block_size=32)
    assert main(["import-mask", "--run", str(other.root), "--spans", str(tmp_path / "w.jsonl"), "--name",
                 "w"]) == 0
    here, there = predicted_tokens(run_copy, "words"), predicted_tokens(other, "w")
    # the streams differ only in their cut tails
    both = set(stream_tokens(run_copy)) & set(stream_tokens(other))
    assert len(here & both) > 0.95 * len(here)
    assert here & both == there & both


def test_a_blocklisted_word_marked_under_one_tokenizer_is_marked_under_another(run_copy, tmp_path,
    data_mirror):
    r = ["--run", str(run_copy.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    spans_file = tmp_path / "w.jsonl"
    assert main(["export-mask", *r, "--mask", "words", "--out", str(spans_file)]) == 0
    neox = prepare_variant(tmp_path, "neox",
                           tokenizer=str(data_mirror / "tokenizers/neox-20b/tokenizer.json"))
    assert main(["import-mask", "--run", str(neox.root), "--spans", str(spans_file), "--name", "w"]) == 0
    transfer = read_info(neox.mask("w"))["transfer"]
    assert transfer["characters_kept_share"] >= 0.95 and transfer["documents_not_found_share"] < 0.05
    # every character of a suppressed span (a blocklisted word's tokens under the trained BPE) that a NeoX
    # token of the same document covers is covered by a marked NeoX token
    spans = SpanMask.load(spans_file)
    marked_chars: dict[str, set[int]] = {}
    for doc, s, e in predicted_tokens(neox, "w"):
        marked_chars.setdefault(doc, set()).update(range(s, e))
    present: dict[str, set[int]] = {}  # characters of the NeoX stream (its cut tail holds no token)
    for doc, s, e in stream_tokens(neox)[1:]:  # the first token is predicted by no position
        present.setdefault(doc, set()).update(range(s, e))
    docs = load_documents(neox.data())
    texts = {document_id(s, i, t): t for s, i, t in zip(docs["source"], docs["source_index"], docs["text"])}
    checked = 0
    for doc, doc_spans in spans.spans.items():
        if doc not in texts:
            continue
        for a, b in doc_spans:
            word = texts[doc][a:b].strip()
            if word and b <= len(texts[doc]):
                wanted = {c for c in range(a, b) if not texts[doc][c].isspace()} & present.get(doc, set())
                assert wanted <= marked_chars.get(doc, set()), word
                checked += 1
    assert checked > 50


def test_a_span_past_its_documents_end_is_refused_before_any_work(run_copy, tmp_path):
    r = ["--run", str(run_copy.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    out = tmp_path / "words.jsonl"
    assert main(["export-mask", *r, "--mask", "words", "--out", str(out)]) == 0
    header, first, *rest = out.read_text().splitlines()
    assert json.loads(header)["metadata"]["documents"] == 1 + len(rest)
    # a billion characters of one document
    crafted = json.loads(first) | {"spans": [[0, 10**9]], "spared": []}
    out.write_text("\n".join([header, json.dumps(crafted), *rest]) + "\n")
    assert main(["import-mask", *r, "--spans", str(out), "--name", "crafted"]) == 2
    assert not run_copy.mask("crafted").exists()
    out.write_text("\n".join([header, first]) + "\n")  # cut at a line boundary: the header's count tells
    assert main(["import-mask", *r, "--spans", str(out), "--name", "cut"]) == 2


def test_documents_match_by_content_when_their_place_moved(run_copy, tmp_path, capsys):
    r = ["--run", str(run_copy.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    out = tmp_path / "words.jsonl"
    assert main(["export-mask", *r, "--mask", "words", "--out", str(out)]) == 0
    header, *rows = out.read_text().splitlines()
    # a line inserted at the top of every source: each document's index is one more, its text the same
    moved = []
    for k, line in enumerate(rows):
        row = json.loads(line)
        source, index, digest = row["doc_id"].rsplit(":", 2)
        if k < 3:  # and three documents of a source this run does not have
            source = row["source"] = "elsewhere"
        row["doc_id"] = f"{source}:{int(index) + 1}:{digest}"
        moved.append(json.dumps(row))
    edited = tmp_path / "moved.jsonl"
    edited.write_text("\n".join([header, *moved]) + "\n")
    capsys.readouterr()
    assert main(["import-mask", *r, "--spans", str(edited), "--name", "moved"]) == 0
    captured = capsys.readouterr()
    out_text = captured.out
    assert "warning: 3 documents of moved.jsonl come from source(s) this run does not have (elsewhere: 3)" \
        in captured.err
    transfer = read_info(run_copy.mask("moved"))["transfer"]
    assert (transfer["documents_by_identity"], transfer["documents_by_content"]) == (0, len(rows) - 3)
    assert transfer["documents_of_unknown_sources"] == 3
    assert f"0 by identity, {len(rows) - 3:,} by content" in out_text
    kept = predicted_tokens(run_copy, "moved")
    assert kept and kept <= predicted_tokens(run_copy, "words")
