"""The suppression objective (Eq. 9) and training: hand-computed loss, alignment, and its effect."""

import json
import math

import numpy as np
import pytest
import torch

from ifguide.data.blocks import block_array, blocks_fingerprint
from ifguide.data.tokenizer import load_tokenizer
from ifguide.model import load_model
from ifguide.training.objective import suppression_loss
from ifguide.training.stage import train


def test_weighted_loss_matches_hand_computation_and_alignment():
    # vocab 2; predictions at positions 0 and 1 target tokens 1 and 2 of the block
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0, 1]])
    suppress = torch.tensor([[False, True, False]])  # penalise the prediction made at position 1 (of token 2)
    ce0, ce1 = math.log(2), math.log(1 + math.exp(2))
    loss = suppression_loss(logits, labels, suppress, lam=0.5)
    assert loss.item() == pytest.approx((ce0 - 0.5 * ce1) / 2, rel=1e-6)
    # marking position 0 instead penalises the other term: alignment matters
    other = suppression_loss(logits, labels, torch.tensor([[True, False, False]]), lam=0.5)
    assert other.item() == pytest.approx((-0.5 * ce0 + ce1) / 2, rel=1e-6)
    assert suppression_loss(logits, labels, None, lam=0.5).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    # num_items_in_batch (gradient accumulation / DDP) replaces the local token count
    assert suppression_loss(logits, labels, suppress, 0.5,
                            num_items=4).item() == pytest.approx((ce0 - 0.5 * ce1) / 4)


def test_mask_and_unlikelihood_objectives_match_hand_computation():
    # the same tiny batch: position 1 predicts token 2 (= 1) with p = 1 / (1 + e^2); position 0 predicts token
    # 1
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0, 1]])
    suppress = torch.tensor([[False, True, False]])
    ce0, p1 = math.log(2), 1 / (1 + math.exp(2))
    masked = suppression_loss(logits, labels, suppress, lam=3.0, objective="mask")
    assert masked.item() == pytest.approx(ce0 / 2, rel=1e-6)  # the marked term is gone, lambda plays no part
    unlikely = suppression_loss(logits, labels, suppress, lam=0.5, objective="unlikelihood")
    assert unlikely.item() == pytest.approx((ce0 - 0.5 * math.log(1 - p1)) / 2, rel=1e-6)
    # unlikelihood lowers p: d/dz1 of -log(1 - p1), p1 = sigmoid(z1 - z0) for the marked token (index 1)
    (grad,) = torch.autograd.grad(unlikely, logits)
    assert grad[0, 1, 1].item() == pytest.approx(0.5 * p1 / 2, rel=1e-5) and grad[0, 1, 1] > 0
    # bounded: a marked token already near p = 0 adds almost nothing, unlike ascent's -lambda * CE
    sure_no = torch.tensor([[[0.0, 0.0], [30.0, 0.0], [0.0, 0.0]]])
    assert suppression_loss(sure_no, labels, suppress, 1.0, objective="unlikelihood").item() == pytest.approx(
        ce0 / 2, abs=1e-6)
    assert suppression_loss(sure_no, labels, suppress, 1.0, objective="ascent").item() < -10
    # p rounding to 1 stays finite
    sure_yes = torch.tensor([[[0.0, 0.0], [0.0, 40.0], [0.0, 0.0]]])
    assert math.isfinite(suppression_loss(sure_yes, labels, suppress, 1.0, objective="unlikelihood").item())
    with pytest.raises(ValueError, match="objective"):
        suppression_loss(logits, labels, suppress, 1.0, objective="descent")


@pytest.mark.parametrize("margin", [5.0, 20.0, 60.0])
def test_unlikelihood_keeps_pushing_at_any_margin(margin):
    """d/dz_target of -log(1 - p) is p: about 1 at large margins, where 1 - exp(-CE) rounds to 0 (a clamped
    form's gradient is exactly 0 there). Checked against float64 autograd of the plain formula."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, margin, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    labels, suppress = torch.tensor([[0, 0, 1]]), torch.tensor([[False, True, False]])
    (grad,) = torch.autograd.grad(suppression_loss(logits, labels, suppress, 1.0, objective="unlikelihood"),
                                  logits)
    exact = logits.detach().double().requires_grad_()
    p = torch.softmax(exact[0, 1], -1)[1]
    (reference,) = torch.autograd.grad(-torch.log1p(-p) / 2 if margin < 30 else
                                       -torch.logsumexp(exact[0, 1, [0, 2]], 0) / 2
                                       + torch.logsumexp(exact[0, 1], 0) / 2, exact)
    torch.testing.assert_close(grad[0, 1].double(), reference[0, 1], rtol=1e-5, atol=1e-7)
    assert grad[0, 1, 1].item() == pytest.approx(p.item() / 2, rel=1e-5) and grad[0, 1, 1] > 0.49  # p / 2


def test_lambda_zero_masks_under_every_objective():
    """Eq. 9 at lambda = 0 drops the marked terms: the same loss as the mask objective, not plain CE."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    suppress = torch.zeros(2, 6, dtype=torch.bool)
    suppress[0, 2] = suppress[1, 4] = True
    masked = suppression_loss(logits, labels, suppress, 1.0, objective="mask")
    plain = suppression_loss(logits, labels, None, 1.0)
    for objective in ("ascent", "unlikelihood"):
        at_zero = suppression_loss(logits, labels, suppress, 0.0, objective=objective)
        assert at_zero.item() == pytest.approx(masked.item(), rel=1e-6) and at_zero.item() != plain.item()


def test_penalty_floor_outside_ascent_is_refused():
    logits, labels = torch.zeros(1, 3, 2), torch.tensor([[1, 0, 1]])
    with pytest.raises(ValueError, match="penalty_floor acts only under objective 'ascent'"):
        suppression_loss(logits, labels, torch.ones(1, 3, dtype=torch.bool), 1.0, penalty_floor=1e-3,
                         objective="unlikelihood")


def test_penalty_floor_stops_penalising_improbable_tokens():
    logits = torch.tensor([[[0.0, 0.0], [9.0, 0.0], [0.0, 0.0]]])  # p(token 2 = 1) = 1.2e-4
    labels = torch.tensor([[1, 0, 1]])
    suppress = torch.tensor([[False, True, False]])
    unbounded = suppression_loss(logits, labels, suppress, lam=1.0)
    floored = suppression_loss(logits, labels, suppress, lam=1.0, penalty_floor=1e-3)
    assert floored.item() == pytest.approx(math.log(2) / 2, rel=1e-6)  # marked term dropped
    assert unbounded.item() < floored.item()


def test_quick_training_lowers_heldout_loss(quick_run):
    info = json.loads((quick_run.model("baseline") / "info.json").read_text())
    assert info["heldout_loss_after"] < info["heldout_loss_before"] - 1.0


def _target_logprob(model, blocks, rows, positions):
    with torch.no_grad():
        ids = torch.as_tensor(blocks[np.unique(rows)], dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    index = {r: k for k, r in enumerate(np.unique(rows))}
    k = np.array([index[r] for r in rows])
    return float(logp[k, positions, ids[k, positions + 1]].mean())


@pytest.mark.slow
def test_masked_training_lowers_probability_of_masked_continuations(quick_run, capsys):
    blocks = block_array(quick_run)
    tok = load_tokenizer(quick_run.data())
    target = tok(" bitch")["input_ids"][0]
    rows, cols = np.nonzero(blocks[:, 1:] == target)  # position j predicts token j + 1
    assert len(rows) > 20
    mask_dir = quick_run.mask("planted")
    mask_dir.mkdir(parents=True)
    np.savez(mask_dir / "marked.npz", blocks=rows.astype(np.int64), positions=cols.astype(np.int32))
    info = {"shape": list(blocks.shape), "fingerprint": "planted",
            "blocks_fingerprint": blocks_fingerprint(quick_run.data())}
    (mask_dir / "info.json").write_text(json.dumps(info))
    cfg = quick_run.load_config()
    capsys.readouterr()
    train(cfg, quick_run, "masked", seed=0, mask="planted", lam=1.0)
    assert "mask 'planted' ascent lambda=1.0\n" in capsys.readouterr().out
    base = _target_logprob(load_model(quick_run.model("baseline")), blocks, rows, cols)
    masked = _target_logprob(load_model(quick_run.model("masked")), blocks, rows, cols)
    print(f"log p(' bitch' | context): baseline {base:.2f}, masked {masked:.2f}")
    assert masked < base - 1.0


def _one_step(batch_size: int, accum: int, tmp_path, mask: np.ndarray) -> dict:
    """Parameters after one optimizer step of SuppressionTrainer with SGD on four fixed blocks."""
    from transformers import TrainingArguments

    from ifguide.data.dataset import BlockDataset
    from ifguide.training.objective import SuppressionTrainer
    from tests.conftest import micro_model

    blocks = np.random.default_rng(0).integers(1, 64, (4, 16)).astype(np.int32)
    model = micro_model(64, 16)
    args = TrainingArguments(output_dir=str(tmp_path / f"t{accum}"), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accum, learning_rate=0.5, max_steps=1, optim="sgd",
                             lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_drop_last=False)
    trainer = SuppressionTrainer(model=model, args=args, train_dataset=BlockDataset(blocks, mask), lam=0.7)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_gives_the_same_step(tmp_path):
    mask = np.random.default_rng(1).random((4, 16)) > 0.8
    full = _one_step(4, 1, tmp_path, mask)
    accumulated = _one_step(2, 2, tmp_path, mask)
    for name, value in full.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6)


def test_finetune_starts_from_the_checkpoint(quick_run):
    cfg = quick_run.load_config()
    cfg.train.max_steps = 5
    train(cfg, quick_run, "finetuned", seed=0, init="baseline")
    base = json.loads((quick_run.model("baseline") / "info.json").read_text())
    tuned = json.loads((quick_run.model("finetuned") / "info.json").read_text())
    assert tuned["heldout_loss_before"] == pytest.approx(base["heldout_loss_after"], rel=1e-4)


def test_matched_tokens_trains_until_the_unmarked_tokens_reach_the_full_steps(quick_run, capsys):
    from ifguide.artifacts import read_info
    from ifguide.config import load_config, with_overrides
    from ifguide.errors import IfguideError
    from ifguide.selection import select
    from ifguide.training.stage import matched_steps

    assert matched_steps(326, 0.02) == 333  # 326 / 0.98 = 332.65: the first step past the filter's tokens
    assert matched_steps(100, 0.5) == 200 and matched_steps(7, 0.0) == 7
    with pytest.raises(IfguideError, match="below 100%"):
        matched_steps(10, 1.0)
    cfg = with_overrides(load_config("quick"), "train", max_steps=4)
    select(cfg, quick_run, None, name="blocklist-matched-test", method="blocklist-tokens")
    share = read_info(quick_run.mask("blocklist-matched-test"))["marked_share"]
    capsys.readouterr()
    train(cfg, quick_run, "blocklist-matched-test", seed=0, mask="blocklist-matched-test", objective="mask",
          matched_tokens=True)
    # lambda weighs nothing under objective mask, so the line does not state one
    assert "mask 'blocklist-matched-test' mask\n" in capsys.readouterr().out
    info = read_info(quick_run.model("blocklist-matched-test"))
    # the fewest steps whose unmarked tokens reach the 4 full steps'
    assert info["steps"] * (1 - share) >= 4 > (info["steps"] - 1) * (1 - share) and info["steps"] > 4
    assert info["recipe"]["config"]["matched_tokens"] is True
    # a model trained without it keeps the recipe it had before the setting existed
    assert "matched_tokens" not in read_info(quick_run.model("baseline"))["recipe"]["config"]
    with pytest.raises(IfguideError, match="--matched-tokens acts only on a mask's tokens"):
        train(cfg, quick_run, "plain-matched-test", seed=0, matched_tokens=True)
    with pytest.raises(IfguideError, match="--matched-tokens needs an objective that trains on every block"):
        train(cfg, quick_run, "drop-matched-test", seed=0, mask="blocklist-matched-test", objective="drop",
              matched_tokens=True)
