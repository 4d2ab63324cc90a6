"""The suppression objective (Eq. 9) and training: hand-computed loss, alignment, and its effect."""

import json
import math

import numpy as np
import pytest
import torch

from ifguide.model import load_model
from ifguide.objective import suppression_loss
from ifguide.prepare import blocks_fingerprint, load_tokenizer
from ifguide.train import block_array, train


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
    assert suppression_loss(logits, labels, suppress, 0.5, num_items=4).item() == pytest.approx((ce0 - 0.5 * ce1) / 4)


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


def test_masked_training_lowers_probability_of_masked_continuations(quick_run):
    blocks = block_array(quick_run)
    tok = load_tokenizer(quick_run.data())
    target = tok(" bitch")["input_ids"][0]
    rows, cols = np.nonzero(blocks[:, 1:] == target)  # position j predicts token j + 1
    assert len(rows) > 20
    mask_dir = quick_run.mask("planted")
    mask_dir.mkdir(parents=True)
    np.savez(mask_dir / "marked.npz", blocks=rows.astype(np.int64), positions=cols.astype(np.int32))
    (mask_dir / "info.json").write_text(json.dumps({"shape": list(blocks.shape), "fingerprint": "planted",
                                                    "blocks_fingerprint": blocks_fingerprint(quick_run.data())}))
    cfg = quick_run.load_config()
    train(cfg, quick_run, "masked", seed=0, mask="planted", lam=1.0)
    base = _target_logprob(load_model(quick_run.model("baseline")), blocks, rows, cols)
    masked = _target_logprob(load_model(quick_run.model("masked")), blocks, rows, cols)
    print(f"log p(' bitch' | context): baseline {base:.2f}, masked {masked:.2f}")
    assert masked < base - 1.0
