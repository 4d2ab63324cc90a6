"""Whole documents as the unit of marking (selection/documents.py) and the `drop` objective's data
(training/drop.py): hand-worked cases, and the drop of the blocklisted documents against prepare's filtered
corpus."""

from __future__ import annotations

import numpy as np
import pytest

from ifguide.config import load_config, with_overrides
from ifguide.data import block_array, load_blocks, load_documents
from ifguide.selection.documents import document_selection, labelled_document_selection
from ifguide.training.drop import blocks_without, dropped_documents

from .test_select import write_scores

# target documents of 2 blocks x 4 positions: document 0 has 3 positions, 1 has 2, 2 has 3
TARGET_DOCS = np.array([[0, 0, 0, 1], [1, 2, 2, 2]])
SCORES = np.array([[1.0, 1.0, 1.0, 5.0], [-1.0, 2.0, 2.0, 2.0]], dtype=np.float32)  # means: 1, 2, 2


def as_pairs(result: dict) -> set[tuple[int, int]]:
    return set(zip(result["blocks"].tolist(), result["positions"].tolist()))


def test_documents_are_taken_whole_by_mean_score_until_the_next_would_pass_the_budget(tmp_path):
    reader = write_scores(tmp_path / "s", SCORES, shard_blocks=1)  # two shards: sums cross a shard edge
    # documents 1 and 2 tie at mean 2 (1 first, by id), then document 0 at 1
    result = document_selection(reader, TARGET_DOCS, budget=5)
    assert as_pairs(result) == {(0, 3), (1, 0), (1, 1), (1, 2), (1, 3)} and result["documents"] == 2
    # a budget of 4 takes document 1 (2 positions); document 2 (3 more) would pass it, and the walk stops
    assert as_pairs(document_selection(reader, TARGET_DOCS, budget=4)) == {(0, 3), (1, 0)}
    assert document_selection(reader, TARGET_DOCS, budget=0.25)["budget_tokens"] == 2  # a fraction of 8


def test_labelled_documents_are_the_toxic_or_blocklisted_ones():
    result = labelled_document_selection(TARGET_DOCS, np.array([True, False, False]),
                                         np.array([False, False, True]))
    assert as_pairs(result) == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)} and result["documents"] == 2


def test_drop_recuts_the_stream_without_the_documents_a_mask_touches():
    ids = np.arange(12).reshape(3, 4)
    doc_ids = np.array([[0, 0, 1, 1], [1, 2, 2, 2], [3, 3, 3, 3]])
    marked = np.zeros((3, 4), dtype=bool)
    marked[0, 1] = True  # position 1 predicts token 2, of document 1
    assert dropped_documents(doc_ids, marked).tolist() == [1]
    marked[2, 3] = True  # the last position reads as its own token (document 3)
    assert dropped_documents(doc_ids, marked).tolist() == [1, 3]
    # without document 1: tokens 0, 1, 5, 6, 7, 8, 9, 10, 11 -> two blocks, the tail of one token left out
    assert blocks_without(ids, doc_ids, np.array([1])).tolist() == [[0, 1, 5, 6], [7, 8, 9, 10]]


def test_dropping_the_blocklisted_documents_gives_prepares_filtered_corpus(quick_run):
    documents = load_documents(quick_run.data()).with_format("numpy")
    doc_ids = np.asarray(load_blocks(quick_run.data()).with_format("numpy")["doc_ids"])
    kept = blocks_without(block_array(quick_run), doc_ids,
                          np.flatnonzero(np.asarray(documents["blocklisted"])))
    filtered = block_array(quick_run, "blocks_filter")
    # prepare cut the filtered stream with the corpus's final tail; the recut stream lacks it
    assert 0 < len(kept) and len(filtered) - len(kept) in (0, 1)
    np.testing.assert_array_equal(kept, filtered[: len(kept)])


def test_clean_trains_on_the_documents_neither_labelled_nor_blocklisted(quick_run):
    from ifguide.artifacts import read_info
    from ifguide.selection import select
    from ifguide.training import train

    cfg = with_overrides(load_config("quick"), "train", max_steps=3)
    select(cfg, quick_run, None, name="clean", method="labelled-documents")
    assert read_info(quick_run.mask("clean"))["labeller"] == "corpus labels"
    train(cfg, quick_run, "clean-test", seed=0, mask="clean", objective="drop")
    documents = load_documents(quick_run.data()).with_format("numpy")
    unclean = np.flatnonzero(np.asarray(documents["toxic_label"]) | np.asarray(documents["blocklisted"]))
    doc_ids = np.asarray(load_blocks(quick_run.data()).with_format("numpy")["doc_ids"])
    expected = blocks_without(block_array(quick_run), doc_ids, unclean)
    info = read_info(quick_run.model("clean-test"))
    assert info["blocks"] == len(expected) and info["penalised_token_share"] == 0.0
    assert info["dropped_token_share"] == pytest.approx(1 - len(expected) / len(block_array(quick_run)))
