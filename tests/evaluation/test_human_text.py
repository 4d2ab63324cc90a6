"""The scorers' floor on human text (evaluation/human.py): windows come from the held-out benign pages, at
distinct starts, as many as the protocol scores."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ifguide.config import load_config, with_overrides
from ifguide.data import block_array, load_tokenizer
from ifguide.evaluation.human import human_text, human_windows


def test_windows_are_distinct_spans_of_the_benign_pages(quick_run):
    cfg = load_config("quick")
    stream = np.asarray(block_array(quick_run, "heldout_benign_blocks")).ravel()
    tok = load_tokenizer(quick_run.data())
    texts = human_windows(quick_run, cfg, 40)
    assert len(texts) == 40
    # every window decodes a span of eval.max_new_tokens tokens of the stream
    spans = {tok.decode(stream[i: i + cfg.eval.max_new_tokens], skip_special_tokens=True)
             for i in range(len(stream) - cfg.eval.max_new_tokens + 1)}
    assert set(texts) <= spans
    assert human_windows(quick_run, cfg, len(stream)) == []  # more windows than distinct starts


def test_human_text_emt_is_the_protocols_max_per_group(quick_run, monkeypatch):
    from ifguide.evaluation import human

    cfg = with_overrides(load_config("quick"), "eval", num_samples=4)
    lengths = {}

    class Length:  # a scorer whose score is known: the text's length over 100
        def score(self, texts):
            lengths["texts"] = texts
            return np.array([len(t) / 100 for t in texts])

    monkeypatch.setattr(human, "get_scorer", lambda name: Length())
    result = human_text(quick_run, cfg, "length", 5, re.compile("a"))
    scores = np.array([len(t) / 100 for t in lengths["texts"]]).reshape(5, 4)
    assert result["emt"] == pytest.approx(scores.max(axis=1).mean()) and result["windows"] == 20
    assert result["blocklisted_share"] == pytest.approx(np.mean(["a" in t.lower() for t in lengths["texts"]]))
