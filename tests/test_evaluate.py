"""Evaluation: metrics against hand-computed values, reproducible generation, scorers and prompt files."""

import json

import numpy as np
import pytest

from ifguide.config import EvalConfig
from ifguide.data.prompts import load_prompts
from ifguide.data.tokenizer import load_tokenizer
from ifguide.errors import IfguideError
from ifguide.evaluation.metrics import summarise, toxicity_metrics
from ifguide.evaluation.stage import evaluate
from ifguide.model import generate, load_model
from ifguide.toxicity.scorers import get_scorer


def test_emt_and_tp_by_hand():
    scores = np.array([[0.1, 0.6, 0.2], [0.2, 0.3, 0.4], [0.5, 0.9, 0.0]])
    m = toxicity_metrics(scores)
    assert m["emt"] == pytest.approx((0.6 + 0.4 + 0.9) / 3)
    assert m["tp"] == pytest.approx(2 / 3)
    assert m["mean"] == pytest.approx(scores.mean())
    assert m["share"] == pytest.approx(3 / 9)
    groups = summarise(scores, [True, False, None], EvalConfig(bootstrap=50))
    assert groups["toxic"]["emt"] == pytest.approx(0.6) and groups["nontoxic"]["emt"] == pytest.approx(0.4)
    lo, hi = groups["all"]["ci"]["emt"]
    assert lo <= groups["all"]["emt"] <= hi


def test_profanity_scorer_separates_obvious_cases():
    scores = get_scorer("profanity-check").score(["you are a fucking idiot", "what a lovely garden"])
    assert scores[0] > 0.5 > scores[1]


def test_missing_or_unknown_scorer_fails_clearly():
    with pytest.raises(IfguideError, match="unknown scorer 'nope'"):
        get_scorer("nope")
    with pytest.raises(IfguideError, match="detoxify"):
        get_scorer("detoxify")
    with pytest.raises(IfguideError, match="hf:/nonexistent"):
        get_scorer("hf:/nonexistent")


def test_generation_is_reproducible(quick_run):
    model, tok = load_model(quick_run.model("baseline")), load_tokenizer(quick_run.data())
    ecfg = EvalConfig(num_samples=3, max_new_tokens=8, prompt_batch_size=2)
    prompts = ["The weather today", "She said that", "In 1990 the"]
    first = generate(model, tok, prompts, ecfg, 40)
    assert first == generate(model, tok, prompts, ecfg, 40)
    assert first != generate(model, tok, prompts, EvalConfig(num_samples=3, max_new_tokens=8, prompt_batch_size=2,
                                                              seed=1), 40)
    assert [len(s) for s in first] == [3, 3, 3]


def test_user_prompt_file(quick_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(IfguideError, match="bad.jsonl:2"):
        load_prompts(quick_run, str(bad))
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "You are such a", "toxic": true}\n{"prompt": "The garden is"}\n')
    out = evaluate(quick_run.load_config(), quick_run, "baseline", prompts=str(mine))
    results = json.loads((out / "results.json").read_text())
    assert results["prompts"].startswith("mine-") and results["num_prompts"] == 2
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * quick_run.load_config().eval.num_samples
    assert all("profanity-check" in json.loads(line)["scores"] for line in lines)
