"""Conditional training: control tokens in the data, hand-worked; the sentence-labels mask; generation that
never samples a control token."""

import numpy as np
import pytest
import torch

from ifguide.data import BlockDataset, control_token_ids, load_tokenizer, sentence_ends
from ifguide.selection.sentences import sentence_selection
from ifguide.training import conditional_blocks, suppression_loss

A, M = 90, 91  # aligned, misaligned
ENDS = np.zeros(100, dtype=bool)
ENDS[[0, 1]] = True  # 0 = end of text, 1 = "."
# Sentences [5 6 .] [7 8 .] [9 .] [5 6 7 8 ...; token 8 of block 0 and token 6 of block 1 are marked.
BLOCKS = np.array([[5, 6, 1, 7, 8, 1], [9, 1, 5, 6, 7, 8]], dtype=np.int32)
SUPPRESS = np.zeros_like(BLOCKS, dtype=bool)
SUPPRESS[0, 3] = SUPPRESS[1, 2] = True  # position j marks token j+1


def test_conditional_blocks_by_hand():
    # stream: A 5 6 . | M 7 8 . | A 9 . | M 5 6 7 8; block 2 restates M as it opens inside a misaligned run;
    # the last partial block (M 5 6 7 8) is dropped
    out = conditional_blocks(BLOCKS, SUPPRESS, ENDS, A, M)
    assert out.tolist() == [[A, 5, 6, 1, M, 7], [M, 8, 1, A, 9, 1]]
    assert out.dtype == BLOCKS.dtype
    unmarked = conditional_blocks(BLOCKS, np.zeros_like(SUPPRESS), ENDS, A, M)
    assert unmarked.tolist() == [[A, 5, 6, 1, 7, 8], [1, 9, 1, 5, 6, 7]]  # one aligned run: one control token


@pytest.mark.parametrize("block_size,n_blocks,density", [(64, 2000, 0.97), (8, 30, 1.0), (2, 50, 0.5)])
def test_conditional_blocks_at_any_marking_density(block_size, n_blocks, density):
    """Dense marks and one sentence longer than many blocks: every block opening inside a misaligned run
    restates its control token, and the corpus's tokens come out in order, none lost but the last partial
    block."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(2, 80, size=(n_blocks, block_size)).astype(np.int32)
    if block_size == 8:
        blocks[:, :] = 5  # one sentence of 30 blocks, no end
    suppress = rng.random(blocks.shape) < density
    out = conditional_blocks(blocks, suppress, ENDS, A, M)
    plain = out[(out != A) & (out != M)]
    assert np.array_equal(plain, blocks.reshape(-1)[:len(plain)])
    assert len(blocks.reshape(-1)) - len(plain) < 2 * block_size
    kinds = {A: False, M: True}
    misaligned = False
    for block in out:
        if misaligned:  # restated, unless an aligned run opens right here
            assert block[0] in (M, A)
        for token in block:
            misaligned = kinds.get(int(token), misaligned)


def test_control_tokens_carry_no_loss():
    item = BlockDataset(np.array([[A, 5, 6, 1, M, 7]]), None, (A, M))[0]
    assert item["labels"].tolist() == [-100, 5, 6, 1, -100, 7]
    assert item["input_ids"].tolist() == [A, 5, 6, 1, M, 7]
    logits = torch.randn(1, 6, 100)
    loss = suppression_loss(logits, item["labels"][None], None, 1.0, objective="conditional")
    targets = [5, 6, 1, 7]  # positions 0, 1, 2, 4 predict them; position 3 would predict M
    expected = -sum(torch.log_softmax(logits[0, j], -1)[t] for j, t in zip((0, 1, 2, 4), targets)) / 4
    assert torch.isclose(loss, expected)
    with pytest.raises(ValueError, match="conditional"):
        suppression_loss(logits, item["labels"][None], torch.ones(1, 6, dtype=torch.bool), 1.0,
                         objective="conditional")


def test_sentence_labels_mark_every_position_predicting_a_toxic_sentence():
    result = sentence_selection(BLOCKS, ENDS, lambda ids: " ".join(map(str, ids)),
                                lambda texts: np.array([0.9 if "8" in t else 0.1 for t in texts]), 0.5)
    # sentences with an 8: [7 8 .] (stream 3-5) and [5 6 7 8] (stream 8-11); stream 6 opens block 1
    marked = sorted(zip(result["blocks"].tolist(), result["positions"].tolist()))
    assert marked == [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert (result["sentences"], result["toxic_sentences"]) == (4, 2)


def test_sentence_ends_follow_the_token_text():
    ends = sentence_ends(["<eos>", " end.", " why?\"", " a", "\n", " Mr"], eos_id=0)
    assert ends.tolist() == [True, True, True, False, True, False]


def test_a_run_tokenizer_has_the_control_tokens_and_generation_never_samples_them(quick_run):
    from ifguide.config import load_config
    from ifguide.model import generate, load_model

    tok = load_tokenizer(quick_run.data())
    aligned, misaligned = control_token_ids(tok)
    assert tok.convert_ids_to_tokens([aligned, misaligned]) == ["<|aligned|>", "<|misaligned|>"]
    assert tok("a <|misaligned|> b")["input_ids"].count(misaligned) == 1  # never split
    model = load_model(quick_run.model("baseline"))
    assert model.get_input_embeddings().num_embeddings == len(tok)
    with torch.no_grad():  # every logit but the control tokens' is 0: unblocked, they would take every sample
        model.get_output_embeddings().weight.zero_()
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.fill_(1.0)
        model.get_output_embeddings().weight[[aligned, misaligned]] = 50.0
    ecfg = load_config("quick").eval
    texts = generate(model, tok, ["Hello there", "A"], ecfg, 32, prefix="<|aligned|>")
    assert all(text for samples in texts for text in samples)  # a control token decodes to ''
