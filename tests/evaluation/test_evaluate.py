"""Evaluation: metrics against hand-computed values, reproducible generation, scorers and prompt files."""

import json

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ifguide.config import EvalConfig, ModelConfig
from ifguide.data.prompts import load_prompts
from ifguide.data.tokenizer import load_tokenizer
from ifguide.errors import IfguideError
from ifguide.evaluation.metrics import summarise, toxicity_metrics
from ifguide.evaluation.stage import evaluate
from ifguide.model import build_model, draw, generate, load_model, sample_continuations, sampling_candidates
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


def test_bootstrap_intervals_equal_a_resample_by_resample_loop():
    from ifguide.evaluation.metrics import bootstrap_intervals, mean_metrics

    rng = np.random.default_rng(3)
    seeds = [rng.random((40, 5)) ** 3, rng.random((40, 5)) ** 2]  # two seeds' matrices of the same prompts
    draws, stream = [], np.random.default_rng(7)
    for _ in range(200):  # the reference: every resample's metrics computed from its own matrices
        rows = stream.integers(0, 40, 40)
        draws.append(mean_metrics([m[rows] for m in seeds], 0.5))
    expected = {k: [np.percentile([d[k] for d in draws], q) for q in (2.5, 97.5)] for k in draws[0]}
    got = bootstrap_intervals(seeds, 0.5, 200, np.random.default_rng(7))
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-12, abs=1e-12), k


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


@pytest.mark.parametrize("top_p,top_k,temperature", [(0.9, 0, 1.0), (0.5, 0, 0.7), (0.9, 20, 1.0),
                                                      (1.0, 0, 1.0), (1.0, 7, 1.3), (0.999, 0, 1.0)])
def test_sampling_candidates_are_what_generate_samples_from(top_p, top_k, temperature):
    """The distribution each step draws from equals softmax of transformers' own temperature, top-k and top-p
    warpers, for peaked rows, flat rows (a nucleus wider than the ranked candidates) and blocked tokens."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(4, 300) * 6, torch.randn(3, 300) * 0.1, torch.randn(2, 300)])
    logits[:, :5] = -float("inf")
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = torch.softmax(warpers(None, logits.clone()), dim=1)
    ids, weights = sampling_candidates(logits.clone(), top_p, top_k, temperature)
    got = torch.zeros_like(logits).scatter_add(1, ids, weights)
    torch.testing.assert_close(got / got.sum(1, keepdim=True), expected, atol=1e-6, rtol=1e-5)


def test_draw_follows_the_weights():
    """Drawn frequencies match the weights within 5 standard errors; a zero weight is never drawn."""
    weights = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 1.0, 0.0]]).repeat(20_000, 1)
    ids = torch.tensor([[10, 11, 12, 13]]).repeat(40_000, 1)
    torch.manual_seed(1)
    picked = draw(ids, weights).view(20_000, 2)
    assert (picked[:, 1] == 12).all() and not (picked[:, 0] == 11).any()
    for token, p in ((10, 0.5), (12, 0.2), (13, 0.3)):
        share = (picked[:, 0] == token).float().mean().item()
        assert abs(share - p) < 5 * (p * (1 - p) / 20_000) ** 0.5


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_sampler_decodes_what_generate_decodes(quick_run, arch):
    """With one candidate (top_k = 1) the sampler is greedy decoding: token for token what transformers'
    `generate` gives, for left-padded prompts of different lengths (one of one token), every copy alike."""
    tok = load_tokenizer(quick_run.data())
    model = (load_model(quick_run.model("baseline")) if arch == "gpt_neox" else
             build_model(ModelConfig(arch="llama", n_layer=2, n_head=2, d_model=32, d_ff=64), len(tok), 64,
                         tok.eos_token_id, seed=0).eval())
    prompts = ["The weather in the north of the country today", "She said", "In", "You are such a"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
    ecfg = EvalConfig(num_samples=2, max_new_tokens=12, top_k=1)
    ours = sample_continuations(model, enc["input_ids"], enc["attention_mask"], 2, ecfg, tok.eos_token_id)
    new = greedy[:, enc["input_ids"].shape[1]:]
    assert torch.equal(ours[:, :new.shape[1]], new.repeat_interleave(2, 0))


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
