"""Token-level blocklist location, selection-quality metrics, the blocklist-tokens baseline, non-finite
scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ifguide.data.lexicon import locate_words, next_token_words
from ifguide.errors import IfguideError
from ifguide.influence import ScoreReader, write_shards
from ifguide.selection.algorithm1 import algorithm1
from ifguide.selection.quality import quality_lines, selection_quality

TEXTS = ["<eos>", " sh", "it", "s", " ok", " Shit", "!", " hell", "o", " crap"]
WORDS = ["crap", "hell", "shit"]


def test_words_are_located_across_token_pieces_as_whole_words():
    blocks = np.array([[1, 2, 4, 5, 6],    # " shit ok Shit!" -> both spellings of "shit"
                       [1, 2, 3, 7, 8],    # " shits hello" -> no whole word
                       [9, 0, 7, 6, 4]])   # " crap<eos> hell! ok"
    found = locate_words(blocks, TEXTS, WORDS)
    assert found.tolist() == [[2, 2, -1, 2, -1], [-1, -1, -1, -1, -1], [0, -1, 1, -1, -1]]
    assert next_token_words(found).tolist() == [[2, -1, 2, -1, -1], [-1] * 5, [-1, 1, -1, -1, -1]]


def test_selection_quality_by_hand():
    # 2 blocks x 4 positions; block 0 from a toxic-labelled document, block 1 not
    provenance = {"token": np.array([[1, 2, 3, 3], [4, 4, 5, 5]]),
                  "toxic_label": np.array([[True] * 4, [False] * 4]),
                  "source": np.array([[0] * 4, [1] * 4]),
                  # 3 positions predict a blocklisted word
                  "word": np.array([[2, -1, 0, -1], [-1, 2, -1, -1]])}
    marked = (np.array([0, 0, 1]), np.array([0, 1, 2]))  # covers (0,0) only among targets
    hits = (np.array([0, 1]), np.array([0, 1]))           # both hits predict a blocklisted word
    q = selection_quality(provenance, marked, hits, TEXTS, WORDS, ["toxic-src", "benign-src"])
    assert q["label_precision"] == pytest.approx(2 / 3)
    assert q["label_corpus_share"] == pytest.approx(0.5)
    assert q["coverage"] == pytest.approx(1 / 3)
    assert q["target_enrichment"] == pytest.approx(1.0 / (3 / 8))
    assert q["coverage_by_word"][0] == {"word": "shit", "targets": 2, "covered": 0.5}
    assert q["frequent_tokens"][0] == [" sh", 1]
    assert q["per_source"]["toxic-src"]["selected_share"] == pytest.approx(2 / 3)


def test_a_corpus_without_blocklisted_words_claims_no_coverage_or_enrichment():
    provenance = {"token": np.array([[1, 2, 3, 4]]), "toxic_label": np.array([[True, True, False, False]]),
                  "source": np.zeros((1, 4), int), "word": np.full((1, 4), -1)}  # e.g. the filtered corpus
    marked = (np.array([0, 0]), np.array([0, 2]))
    q = selection_quality(provenance, marked, marked, TEXTS, WORDS, ["src"])
    assert "target_enrichment" not in q and q["coverage_by_word"] == [] and q["label_precision"] == 0.5
    lines = quality_lines(q)
    assert lines[1] == "no position predicts a blocklisted word: coverage and enrichment do not apply"
    assert not any(line.startswith(("coverage", "target enrichment")) for line in lines)


def test_non_finite_scores_are_refused_when_written_and_when_read(tmp_path):
    scores = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    scores[2, 3] = np.nan
    with pytest.raises(IfguideError, match="1 non-finite"):
        write_shards(tmp_path, [(0, scores)], scores.shape, "float32")
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "shard_000000000.npy", scores)  # written by something else
    (tmp_path / "s" / "info.json").write_text(json.dumps(
        {"shape": [6, 8], "dtype": "float32", "shards": [{"file": "shard_000000000.npy", "start": 0,
                                                          "stop": 6}]}))
    with pytest.raises(IfguideError, match="non-finite"):
        algorithm1(ScoreReader(tmp_path / "s"), 0.99, 1, 0.02)


def test_blocklist_tokens_marks_exactly_the_windows_around_blocklisted_targets(quick_run):
    from ifguide.selection.masks import load_mask
    from ifguide.selection.quality import load_provenance
    from ifguide.selection.stage import select

    cfg = quick_run.load_config()
    word = load_provenance(quick_run.data())["word"]
    expected = np.zeros(word.shape, dtype=bool)
    for b, j in zip(*np.nonzero(word >= 0)):
        expected[b, max(j - 1, 0): j + 2] = True

    def dense(mask):
        return np.stack([mask[i] for i in range(len(mask))])

    roomy = load_mask(select(cfg, quick_run, None, name="lexicon-all", method="blocklist-tokens", budget=0.2))
    assert expected.sum() <= roomy.info["budget_tokens"]
    assert np.array_equal(dense(roomy), expected) and roomy.info["quality"]["coverage"] == 1.0
    tight = load_mask(select(cfg, quick_run, None, name="lexicon", method="blocklist-tokens", budget=0.01))
    marked = dense(tight)
    assert 0 < marked.sum() <= tight.info["budget_tokens"] < expected.sum()
    assert not (marked & ~expected).any()  # only blocklist windows, taken in corpus order
    last = np.nonzero(marked.any(axis=1))[0].max()
    assert np.array_equal(marked[:last], expected[:last])
