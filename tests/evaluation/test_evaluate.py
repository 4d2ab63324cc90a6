"""Evaluation: metrics against hand-computed values, reproducible generation, scorers and prompt files."""

import json

import numpy as np
import pytest
import torch

from ifguide.config import EvalConfig, ModelConfig
from ifguide.data.prompts import load_prompts
from ifguide.data.tokenizer import load_tokenizer
from ifguide.errors import IfguideError
from ifguide.evaluation.metrics import summarise, toxicity_metrics
from ifguide.evaluation.stage import evaluate
from ifguide.model import build_model, cache_argument, generate, load_model, prompt_cache
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
    assert first != generate(model, tok, prompts, EvalConfig(num_samples=3, max_new_tokens=8,
                                                             prompt_batch_size=2,
                                                              seed=1), 40)
    assert [len(s) for s in first] == [3, 3, 3]


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_prompt_cache_samples_what_plain_generate_samples(quick_run, arch):
    """Encoding each prompt once and repeating its cache changes nothing: the same logits and, seed for seed,
    the same samples as `generate` with num_return_sequences, for left-padded prompts of different lengths
    (one of one token)."""
    tok = load_tokenizer(quick_run.data())
    model = (load_model(quick_run.model("baseline")) if arch == "gpt_neox" else
             build_model(ModelConfig(arch="llama", n_layer=2, n_head=2, d_model=32, d_ff=64), len(tok), 64,
                         tok.eos_token_id, seed=0).eval())
    ecfg = EvalConfig(num_samples=3, max_new_tokens=6, prompt_batch_size=4, top_p=0.9)
    prompts = ["The weather in the north of the country today", "She said", "In", "You are such a"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    repeated = {k: v.repeat_interleave(3, 0) for k, v in enc.items()}
    with torch.no_grad():
        full = model(**repeated,
                     position_ids=(repeated["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        cache = prompt_cache(model, enc["input_ids"], enc["attention_mask"], 3)
        assert cache.get_seq_length() == enc["input_ids"].shape[1] - 1
        last = {"input_ids": repeated["input_ids"][:, -1:], "attention_mask": repeated["attention_mask"],
                "position_ids": repeated["attention_mask"].sum(-1, keepdim=True) - 1,
                cache_argument(model): cache}
        cached = model(**last, use_cache=True).logits[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    torch.manual_seed(ecfg.seed * 1_000_003)  # batch 0's seed in generate
    plain = model.generate(**enc, do_sample=True, top_p=0.9, top_k=0, max_new_tokens=6,
                           num_return_sequences=3,
                           pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate(model, tok, prompts, ecfg, 40) == [texts[3 * i: 3 * i + 3] for i in range(len(prompts))]


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
