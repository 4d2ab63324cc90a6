"""Differential per-token influence scores against independent references (issue: EK-FAC via stock Kronfluence)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kronfluence.arguments import ScoreArguments
from safetensors.torch import load_file

from ifguide.config import InfluenceConfig
from ifguide.errors import IfguideError
from ifguide.influence import (
    FACTORS,
    QueryRows,
    _analyzer,
    discover_tracked_modules,
    factors_dir,
    fit_factors,
    query_weights,
    score_shards,
)
from ifguide.train import BlockDataset
from tests.conftest import ListQueries, micro_model, micro_queries

VOCAB, BLOCK = 64, 16


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def per_token(model, blocks, queries, kind, icfg, work: Path, factors_root: Path, damping=None) -> np.ndarray:
    return np.concatenate([s for _, s in score_shards(model, blocks, queries, kind, icfg, factors_root,
                                                     work / kind, damping=damping)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro model, 40 random blocks, 10+10 queries, and EK-FAC and identity factors fitted on them."""
    root = tmp_path_factory.mktemp("influence")
    rng = np.random.default_rng(0)
    blocks = rng.integers(1, VOCAB, (40, BLOCK)).astype(np.int32)
    queries = ListQueries(micro_queries(rng, 10, 10, VOCAB))
    model = micro_model(VOCAB, BLOCK)
    model.eval()
    fitted = {}
    for strategy in ("ekfac", "identity"):
        icfg = InfluenceConfig(strategy=strategy, factor_batch_size=8, train_batch_size=8, query_batch_size=8,
                               shard_blocks=16)
        fit_factors(copy.deepcopy(model), blocks, icfg, root / strategy, seed=0)
        fitted[strategy] = icfg
    return {"root": root, "blocks": blocks, "queries": queries, "model": model, "icfg": fitted}


def test_tracked_modules_are_block_linears_only(setup):
    tracked = discover_tracked_modules(setup["model"])
    assert tracked and all(name.startswith("gpt_neox.layers.") for name in tracked)
    assert len(tracked) == 4 * 2  # qkv, dense, h_to_4h, 4h_to_h per layer
    assert "embed_out" not in tracked


def test_conv1d_models_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(IfguideError, match="Conv1D"):
        discover_tracked_modules(gpt2)


def test_query_weights_are_signed_means():
    w = query_weights(np.array([True, True, False, False, False]), "toxic-minus-nontoxic")
    np.testing.assert_allclose(w, [0.5, 0.5, -1 / 3, -1 / 3, -1 / 3])
    np.testing.assert_allclose(query_weights(np.array([True, False]), "toxic"), [1.0, 0.0])


def test_a_differential_equals_toxic_minus_nontoxic(setup, tmp_path):
    s = setup
    icfg, root = s["icfg"]["ekfac"], s["root"] / "ekfac"
    diff = per_token(s["model"], s["blocks"], s["queries"], "toxic-minus-nontoxic", icfg, tmp_path, root, damping=1e-3)
    toxic = per_token(s["model"], s["blocks"], s["queries"], "toxic", icfg, tmp_path, root, damping=1e-3)
    nontoxic = per_token(s["model"], s["blocks"], s["queries"], "nontoxic", icfg, tmp_path, root, damping=1e-3)
    err = rel_err(diff, toxic - nontoxic)
    print(f"(a) differential vs toxic - nontoxic: relative error {err:.2e}")
    assert err < 1e-4


def test_b_per_token_sums_to_per_block(setup, tmp_path):
    s = setup
    icfg, root = s["icfg"]["ekfac"], s["root"] / "ekfac"
    tokens = per_token(s["model"], s["blocks"], s["queries"], "toxic-minus-nontoxic", icfg, tmp_path, root)
    work = tmp_path / "block"
    (work / "kronfluence").mkdir(parents=True)
    factors_dir(work).symlink_to(factors_dir(root).resolve())
    analyzer = _analyzer(copy.deepcopy(s["model"]), discover_tracked_modules(s["model"]), work)
    analyzer.compute_pairwise_scores(
        scores_name="block", factors_name=FACTORS, query_dataset=QueryRows(s["queries"], "toxic-minus-nontoxic"),
        train_dataset=BlockDataset(s["blocks"]), per_device_query_batch_size=8, per_device_train_batch_size=8,
        score_args=ScoreArguments(aggregate_query_gradients=True, damping_factor=None), overwrite_output_dir=True)
    per_block = analyzer.load_pairwise_scores("block")["all_modules"].reshape(-1).numpy()
    err = rel_err(tokens.sum(axis=1), per_block)
    print(f"(b) per-token sums vs per-block scores: relative error {err:.2e}")
    assert err < 1e-4


def query_gradient(model, queries, kind, tracked) -> dict[str, torch.Tensor]:
    """Plain-autograd gradient of sum_r w_r * summed continuation loss, as [dW | db] per tracked module."""
    model.zero_grad()
    weights = torch.tensor(query_weights(np.asarray(queries["toxic"]), kind))
    ids = torch.tensor(queries["input_ids"])
    labels = torch.tensor(queries["labels"])
    logits = model(input_ids=ids, attention_mask=torch.tensor(queries["attention_mask"])).logits[:, :-1]
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
    (ce * weights).sum().backward()
    modules = dict(model.named_modules())
    return {n: torch.cat([modules[n].weight.grad, modules[n].bias.grad[:, None]], 1).detach() for n in tracked}


def per_token_reference(model, blocks, directions: dict[str, torch.Tensor]) -> np.ndarray:
    """dL_i/d eps_{i,t} where each tracked Linear's output at t moves by eps_{i,t} * (P_w a_t + P_b)."""
    ids = torch.tensor(blocks, dtype=torch.long)
    eps = torch.zeros(ids.shape, requires_grad=True)
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda mod, inp, out, p=p: out + eps[..., None] * (inp[0] @ p[:, :-1].T + p[:, -1]))
        for name, p in directions.items()]
    logits = model(input_ids=ids).logits[:, :-1]
    F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()
    return eps.grad.numpy()


def test_c_identity_scores_equal_autograd_dot_products(setup, tmp_path):
    s = setup
    scores = per_token(s["model"], s["blocks"], s["queries"], "toxic-minus-nontoxic", s["icfg"]["identity"],
                       tmp_path, s["root"] / "identity")
    reference_model = copy.deepcopy(s["model"])
    tracked = discover_tracked_modules(reference_model)
    grads = query_gradient(reference_model, s["queries"], "toxic-minus-nontoxic", tracked)
    reference = per_token_reference(reference_model, s["blocks"], grads)
    err = rel_err(scores, reference)
    print(f"(c) identity vs autograd: relative error {err:.2e}")
    assert err < 1e-4


def test_last_layers_scores_only_the_top_blocks(setup, tmp_path):
    """With last_layers=1 the scores are the autograd dot products over the last block's Linears only."""
    s = setup
    icfg = InfluenceConfig(strategy="identity", last_layers=1, factor_batch_size=8, train_batch_size=8,
                           query_batch_size=8, shard_blocks=16)
    tracked = discover_tracked_modules(s["model"], last_layers=1)
    assert tracked == [n for n in discover_tracked_modules(s["model"]) if n.startswith("gpt_neox.layers.1.")]
    fit_factors(copy.deepcopy(s["model"]), s["blocks"], icfg, tmp_path / "factors", seed=0)
    scores = per_token(s["model"], s["blocks"], s["queries"], "toxic-minus-nontoxic", icfg, tmp_path,
                       tmp_path / "factors")
    reference_model = copy.deepcopy(s["model"])
    grads = query_gradient(reference_model, s["queries"], "toxic-minus-nontoxic", tracked)
    err = rel_err(scores, per_token_reference(reference_model, s["blocks"], grads))
    print(f"last_layers=1 identity vs autograd on the last block: relative error {err:.2e}")
    assert err < 1e-4


def test_d_ekfac_scores_equal_autograd_with_fitted_eigenbases(setup, tmp_path):
    s = setup
    damping = 1e-3
    scores = per_token(s["model"], s["blocks"], s["queries"], "toxic-minus-nontoxic", s["icfg"]["ekfac"],
                       tmp_path, s["root"] / "ekfac", damping=damping)
    reference_model = copy.deepcopy(s["model"])
    tracked = discover_tracked_modules(reference_model)
    grads = query_gradient(reference_model, s["queries"], "toxic-minus-nontoxic", tracked)
    fdir = factors_dir(s["root"] / "ekfac")
    q_a = load_file(fdir / "activation_eigenvectors.safetensors")
    q_g = load_file(fdir / "gradient_eigenvectors.safetensors")
    lam = load_file(fdir / "lambda_matrix.safetensors")
    n_lam = load_file(fdir / "num_lambda_processed.safetensors")
    preconditioned = {}
    for name, g in grads.items():
        a, b = q_a[name].double(), q_g[name].double()
        eigen = lam[name].double() / n_lam[name].double() + damping
        preconditioned[name] = (b @ ((b.T @ g.double() @ a) / eigen) @ a.T).float()
    reference = per_token_reference(reference_model, s["blocks"], preconditioned)
    err = rel_err(scores, reference)
    print(f"(d) EK-FAC vs autograd with fitted eigenbases: relative error {err:.2e}")
    assert err < 1e-4


def test_e_planted_toxic_spans_rank_on_top(tmp_path):
    """Blocks with a planted span that the toxic queries echo: top per-token scores land on the span."""
    rng = np.random.default_rng(1)
    vocab, block, span = 48, 16, [40, 41, 42, 43]
    blocks = rng.integers(1, 32, (160, block)).astype(np.int32)
    planted = np.zeros(blocks.shape, dtype=bool)
    for i in rng.choice(len(blocks), 24, replace=False):
        j = int(rng.integers(1, block - len(span)))
        blocks[i, j: j + len(span)] = span
        planted[i, j - 1: j + len(span) - 1] = True  # positions whose prediction target is a span token
    model = micro_model(vocab, block, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor(blocks, dtype=torch.long)
    model.train()
    for step in range(150):
        batch = ids[torch.randint(0, len(ids), (16,), generator=torch.Generator().manual_seed(step))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    queries = ListQueries(micro_queries(rng, 16, 16, 32, toxic_span=span))
    icfg = InfluenceConfig(factor_batch_size=16, train_batch_size=16, query_batch_size=16, shard_blocks=80)
    fit_factors(copy.deepcopy(model), blocks, icfg, tmp_path / "f", seed=0)
    scores = per_token(model, blocks, queries, "toxic-minus-nontoxic", icfg, tmp_path, tmp_path / "f")
    k = int(planted.sum())
    top = np.argsort(scores.ravel())[::-1][:k]
    precision = planted.ravel()[top].mean()
    chance = planted.mean()
    print(f"(e) planted spans: precision@{k} = {precision:.2f}, chance = {chance:.3f} "
          f"({precision / chance:.1f}x)")
    assert precision >= 3 * chance
    shutil.rmtree(tmp_path / "f")


def test_llama_tracked_modules():
    from ifguide.config import ModelConfig
    from ifguide.model import build_model

    llama = build_model(ModelConfig(arch="llama", n_layer=2, n_head=2, d_model=16, d_ff=32), 64, 16, 0, 0)
    tracked = discover_tracked_modules(llama)
    assert len(tracked) == 2 * 7 and all(".layers." in name for name in tracked)
    assert not any("lm_head" in name or "embed" in name for name in tracked)


def test_proxy_model_scores_the_main_models_blocks(quick_run):
    """A smaller proxy (same tokenizer) computes factors and scores whose mask trains the main model."""
    from ifguide.influence import factors, scores
    from ifguide.prepare import blocks_fingerprint
    from ifguide.select import load_mask, select
    from ifguide.train import train

    cfg = quick_run.load_config()
    train(cfg, quick_run, "proxy", seed=0, arch="proxy")
    factors(cfg, quick_run, "proxy")
    scores(cfg, quick_run, "proxy")
    mask_dir = select(cfg, quick_run, "proxy/toxic-minus-nontoxic", name="from-proxy")
    mask = load_mask(mask_dir, expect_blocks=blocks_fingerprint(quick_run.data()))
    proxy = json.loads((quick_run.model("proxy") / "info.json").read_text())
    main = json.loads((quick_run.model("baseline") / "info.json").read_text())
    assert proxy["parameters"] < main["parameters"] / 2
    assert 0 < mask.info["marked_tokens"] <= mask.info["budget_tokens"]
