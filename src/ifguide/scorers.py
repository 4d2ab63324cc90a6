"""Toxicity scorers behind one small interface: a name and `score(texts) -> probabilities`."""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import IfguideError


class Scorer:
    """Maps texts to toxicity probabilities in [0, 1]."""

    name: str = "scorer"

    def score(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class ProfanityCheck(Scorer):
    """alt-profanity-check: a linear SVM over word n-grams that ships its weights (offline)."""

    name = "profanity-check"

    def __init__(self, cache: Path | None = None):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise IfguideError("scorer 'profanity-check' needs `pip install alt-profanity-check`") from None
        self._predict = predict_prob

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._predict(list(texts)), dtype=np.float64) if texts else np.zeros(0)


class ToxiGenScorer(Scorer):
    """Implicit-toxicity scorer trained here: TF-IDF + logistic regression on ToxiGen hate/neutral statements."""

    name = "toxigen"

    def __init__(self, cache: Path | None = None):
        path = cache / "model.pkl" if cache else None
        if path is not None and path.is_file():
            self.model, self.auc = pickle.loads(path.read_bytes())
        else:
            self.model, self.auc = train_toxigen_scorer()
            if path is not None:
                from .artifacts import write_json

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_bytes(pickle.dumps((self.model, self.auc)))
                os.replace(tmp, path)
                write_json(cache / "info.json", {"heldout_auc": self.auc})
        print(f"scorer toxigen: held-out AUC {self.auc:.3f}")

    def score(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(list(texts))[:, 1] if texts else np.zeros(0)


def train_toxigen_scorer(seed: int = 0) -> tuple[object, float]:
    """Fit TF-IDF + logistic regression on ToxiGen statements; returns (model, held-out AUC)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline

    from .corpora import toxigen_statements

    rows = [(s.strip().lstrip("-").strip(), hate) for line, hate in toxigen_statements() for s in line.split("\n")]
    rows = sorted({r for r in rows if r[0]})
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    texts, labels = [t for t, _ in rows], np.array([h for _, h in rows], dtype=int)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                          LogisticRegression(max_iter=1000, C=4.0))
    model.fit(texts[:cut], labels[:cut])
    auc = float(roc_auc_score(labels[cut:], model.predict_proba(texts[cut:])[:, 1]))
    return model, auc


class Detoxify(Scorer):
    """Detoxify ('original'); needs the package and its downloaded weights."""

    name = "detoxify"

    def __init__(self, cache: Path | None = None):
        try:
            from detoxify import Detoxify as _Detoxify

            self.model = _Detoxify("original", device="cpu")
        except ImportError:
            raise IfguideError("scorer 'detoxify' needs `pip install detoxify` (extra: ifguide[detoxify])") from None
        except Exception as exc:  # noqa: BLE001 - download failures come in many types
            raise IfguideError(f"scorer 'detoxify' could not load its weights ({type(exc).__name__}); it needs "
                               "internet access once, or use the offline 'profanity-check' scorer") from None

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.predict(list(texts))["toxicity"], dtype=np.float64) if texts else np.zeros(0)


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
    "detoxify": Detoxify,
}


def get_scorer(name: str, cache: Path | None = None) -> Scorer:
    """A scorer by name (`hf:PATH` for a local classifier); an unknown name is a clear error."""
    if name.startswith("hf:"):
        return HFClassifier(name[3:])
    if name not in SCORERS:
        raise IfguideError(f"unknown scorer '{name}' (available: {', '.join(SCORERS)}, hf:PATH)")
    return SCORERS[name](cache)
