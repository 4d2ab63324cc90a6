"""The Python API checks shapes and values in one line, and padding on either side gives the same loss."""

import math

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, TrainingArguments

import ifguide

LOGITS = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("change,message", [
    ({"suppress": torch.ones(1, 5, dtype=torch.bool)}, "suppress must have the shape of labels"),
    ({"suppress": torch.ones(2, 2, dtype=torch.bool)}, "suppress must have the shape of labels"),
    ({"logits": torch.full((2, 5, 8), math.nan)}, "NaN"),
    ({"lam": -1.0}, "lam must be a finite number >= 0"),
    ({"lam": math.nan}, "lam must be a finite number >= 0"),
    ({"penalty_floor": 0.0}, r"penalty_floor must be in \(0, 1\)"),
    ({"penalty_floor": 1.5}, r"penalty_floor must be in \(0, 1\)"),
    ({"num_items": 0}, "num_items must be a positive token count"),
    ({"labels": LABELS[:, :4]}, "labels"),
])
def test_suppression_loss_refuses_bad_arguments_in_one_line(change, message):
    arguments = {"logits": LOGITS, "labels": LABELS, "suppress": torch.zeros(2, 5, dtype=torch.bool),
                 "lam": 1.0,
                 "penalty_floor": None, "num_items": None} | change
    with pytest.raises(ValueError, match=message) as caught:
        ifguide.suppression_loss(**arguments)
    assert "\n" not in str(caught.value)


def test_token_flags_refuse_offsets_of_the_wrong_shape():
    mask = ifguide.SpanMask()
    mask.add("d", [[0, 2]])
    assert mask.token_flags("d", [[0, 1], [1, 3], [3, 4]]).tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"\(tokens, 2\)"):
        mask.token_flags("d", [0, 1, 1, 3])
    with pytest.raises(ValueError, match=r"\(tokens, 2\)"):
        mask.token_flags("d", [[0, 1, 2]])


def test_padding_on_either_side_gives_the_same_loss(tmp_path):
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = ifguide.SuppressionTrainer(model=model, args=args, lam=1.0)
    rows = [[3, 4, 5, 6, 7], [8, 9, 10]]
    suppressed = [[False, True, False, False, False], [True, False, False]]

    def batch(left: bool) -> dict:
        width = max(map(len, rows))
        pad = [width - len(r) for r in rows]
        place = (lambda row, fill, n: [fill] * n + row) if left else (lambda row, fill, n: row + [fill] * n)
        return {"input_ids": torch.tensor([place(r, 0, n) for r, n in zip(rows, pad)]),
                "labels": torch.tensor([place(r, 0, n) for r, n in zip(rows, pad)]),  # pad labels on purpose
                "attention_mask": torch.tensor([place([1] * len(r), 0, n) for r, n in zip(rows, pad)]),
                "suppress": torch.tensor([place(s, False, n) for s, n in zip(suppressed, pad)])}

    model.train()
    right = trainer.compute_loss(model, batch(left=False))
    left = trainer.compute_loss(model, batch(left=True))
    assert torch.allclose(right, left, atol=1e-5), (right, left)
    alone = [trainer.compute_loss(model, {"input_ids": torch.tensor([r]), "labels": torch.tensor([r]),
                                          "suppress": torch.tensor([s])}) for r, s in zip(rows, suppressed)]
    counts = [len(r) - 1 for r in rows]  # the batch loss is the token-weighted mean of the rows' losses
    assert torch.allclose(right, sum(a * c for a, c in zip(alone, counts)) / sum(counts), atol=1e-5)
    with pytest.raises(ValueError, match="the batch has no labels"):
        trainer.compute_loss(model, {"input_ids": torch.tensor([rows[0]])})


def test_the_api_refuses_bad_values_in_one_line(tmp_path):
    import numpy as np

    from ifguide.errors import IfguideError

    mask = ifguide.SpanMask()
    for spans in ([[-5, 3]], [[9, 4]], [[1, 2, 3]]):
        with pytest.raises(ValueError, match="is not \\[start, end\\)"):
            mask.add("d", spans)
    assert "d" not in mask.spans  # nothing half-added
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for settings, message in (({"lam": -2.0}, "lam must be"), ({"lam": "1"}, "lam must be"),
                              ({"objective": "descent"}, "objective"),
                              ({"penalty_floor": 0.1, "objective": "mask"}, "penalty_floor acts only")):
        with pytest.raises(ValueError, match=message):
            ifguide.SuppressionTrainer(model=model, args=args, **settings)
    collator = ifguide.SuppressionCollator(mask, pad_token_id=np.int64(0))  # a numpy integer is a token id
    assert collator.pad_token_id == 0
    with pytest.raises(IfguideError, match="no features"):
        collator([])
    with pytest.raises(IfguideError, match="feature 1 has no tokens"):
        collator([{"input_ids": [1, 2], "offset_mapping": [[0, 1], [1, 2]], "doc_id": "d"},
                  {"input_ids": [], "offset_mapping": [], "doc_id": "e"}])
    with pytest.raises(IfguideError, match="pad_token_id"):
        ifguide.SuppressionCollator(mask, pad_token_id=True)
