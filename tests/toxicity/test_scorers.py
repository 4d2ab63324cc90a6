"""Scorers: the two BiLSTM ports against the values their packages document, and the guarded unpickling."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from ifguide.errors import IfguideError
from ifguide.toxicity.scorers import JigsawLSTM, ToxicCommentClassifier, _StateOnlyUnpickler, get_scorer


@pytest.fixture(scope="module")
def lstm() -> JigsawLSTM:
    return get_scorer("jigsaw-lstm")


def test_jigsaw_lstm_matches_the_packages_documented_outputs(lstm):
    # tox-block 0.1.2's README: make_predictions(..., rescale=True)["toxic"] for these texts
    texts = ["Good morning my friend, I hope you're having a fantastic day!",
             "I will kill you, you fucking idiot!",
             "I do strongly disagree with the fascist views of this joke that calls itself a "
             "political party."]
    expected = [0.05347811430692673, 0.9998680353164673, 0.026190076023340225]
    np.testing.assert_allclose(lstm.score(texts), expected, atol=1e-5)


def test_toxic_comment_classifier_matches_the_packages_documented_outputs():
    # toxic-comment-classifier 0.3.0's README: classify(...) for one text, and predict_batch (mean of the six)
    # for six
    scorer = get_scorer("toxic-comment-classifier")
    assert isinstance(scorer, ToxicCommentClassifier)
    np.testing.assert_allclose(scorer.probabilities(["You are so dumb and stupid!"])[0],
                               [0.9889402985572815, 0.07256772369146347, 0.620429277420044,
                                0.01934845559298992,
                                0.8664075136184692, 0.04072948172688484], atol=1e-6)
    texts = ["I hate you so much!", "This is wonderful news.", "You're disgusting!",
             "Absolutely love your energy!",
             "You're the worst person ever!", "Have a nice day :)"]
    np.testing.assert_allclose(scorer.probabilities(texts).mean(axis=1),
                               [0.1395, 0.0013, 0.3110, 0.0088, 0.0937, 0.0115], atol=5e-5)
    np.testing.assert_allclose(scorer.score(texts), scorer.probabilities(texts)[:, 0])  # the `toxic` output


def test_jigsaw_lstm_reads_the_last_100_known_words_padded_in_front(lstm):
    known = [w for w, i in lstm.word_index.items() if i < 50][:3]
    ids = lstm.encode([f"{known[0]}, {known[1]}!!  {known[2].upper()} zzqxunknownword"])[0]
    assert ids[:-3].tolist() == [0] * 97
    assert ids[-3:].tolist() == [lstm.word_index[w] for w in known]
    long = lstm.encode([" ".join([known[0]] * 150 + [known[1]] * 50)])[0]
    assert (long == lstm.word_index[known[1]]).sum() == 50 and len(long) == 100


def every_step(lstm: JigsawLSTM, texts: list[str]) -> np.ndarray:
    """The six outputs with every step of both directions run for every row, as Keras runs them."""
    import torch

    w = lstm.weights
    with torch.no_grad():
        x = w["embedding"][torch.from_numpy(lstm.encode(texts))]
        both = torch.cat([lstm._lstm(x, *w["lstm"]["forward"], reverse=False)[0],
                          lstm._lstm(x, *w["lstm"]["backward"], reverse=True)[0]], dim=2)
        hidden = torch.relu(both.max(dim=1).values @ w["dense"][0] + w["dense"][1])
        return torch.sigmoid(hidden @ w["out"][0] + w["out"][1]).numpy()


def test_the_padding_shared_by_every_row_is_run_once_with_the_same_outputs(lstm):
    texts = ["you idiot", "", "good morning " * 70, "what a lovely day it is"]
    # nothing shared (a row of 140 words), most steps shared, every step shared (only empty rows)
    for batch in (texts, [texts[0], texts[3]], ["", ""]):
        np.testing.assert_allclose(lstm.probabilities(batch), every_step(lstm, batch), atol=1e-6)


def test_the_encoder_unpickler_refuses_any_other_class():
    class Evil:
        def __reduce__(self):
            return (print, ("pickles are code",))

    with pytest.raises(IfguideError, match="refusing to unpickle"):
        _StateOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_the_toxigen_scorer_is_refitted_from_its_statements():
    scorer = get_scorer("toxigen")  # no cache to read: a pickled model in a run directory could run code
    assert scorer.auc > 0.8 and scorer.score(["a neutral statement about the weather"]).shape == (1,)
