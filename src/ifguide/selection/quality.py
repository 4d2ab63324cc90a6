"""Selection quality without training: does a mask land on toxic loss terms?

- label precision: the share of marked positions whose target token lies in a document that its source labels
  toxic, against that share over the whole corpus;
- target enrichment: among the positions above tau (the top 1% at the default quantile), the share whose next
  token is part of a blocklisted word, over that share among all positions;
- coverage: the share of positions predicting a blocklisted word that the mask marks, overall and for the 20
  most frequent blocklisted words;
- the 30 most frequently marked target tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..data import next_token_words


def load_provenance(data_dir: Path, block_set: str = "blocks") -> dict[str, np.ndarray]:
    """Per training position: target token, its document (id and toxic label), its source, its blocklisted
    word id."""
    from ..data import load_blocks, load_documents

    blocks = load_blocks(data_dir, block_set).with_format("numpy")
    labels = np.asarray(load_documents(data_dir)["toxic_label"], dtype=bool)

    def target(column: str) -> np.ndarray:  # position j is scored and marked for token j+1
        values = np.asarray(blocks[column])
        return np.concatenate([values[:, 1:], values[:, -1:]], axis=1)

    docs = target("doc_ids")
    return {"token": target("input_ids"), "doc": docs, "toxic_label": labels[docs],
            "source": target("source_ids"),
            "word": next_token_words(np.asarray(blocks["blocklist_word"]))}


def selection_quality(provenance: dict[str, np.ndarray], marked: tuple[np.ndarray, np.ndarray],
                      hits: tuple[np.ndarray, np.ndarray] | None, token_texts: list[str], words: list[str],
                      source_names: list[str]) -> dict:
    """The metrics above for one mask (`marked`: block and position arrays) and its above-tau positions
    (`hits`)."""
    labels, word = provenance["toxic_label"], provenance["word"]
    is_target = word >= 0
    marked_word = word[marked]
    out = {"label_precision": float(labels[marked].mean()) if len(marked[0]) else 0.0,
           "label_corpus_share": float(labels.mean()),
           "target_base_rate": float(is_target.mean()),
           "coverage": float((marked_word >= 0).sum() / max(is_target.sum(), 1))}
    if hits is not None and len(hits[0]) and is_target.any():
        out["target_enrichment"] = float(is_target[hits].mean() / max(is_target.mean(), 1e-12))
    frequent_words = Counter(word[is_target].tolist()).most_common(20)
    marked_counts = Counter(marked_word[marked_word >= 0].tolist())
    out["coverage_by_word"] = [{"word": words[w], "targets": n, "covered": marked_counts.get(w, 0) / n}
                               for w, n in frequent_words]
    tokens = Counter(provenance["token"][marked].tolist())
    out["frequent_tokens"] = [[token_texts[t], n] for t, n in tokens.most_common(30)]
    sources = Counter(provenance["source"][marked].tolist())
    corpus = Counter(provenance["source"].ravel().tolist())
    total, n_corpus = max(len(marked[0]), 1), provenance["source"].size
    out["per_source"] = {name: {"selected_share": sources.get(i, 0) / total,
                                "corpus_share": corpus.get(i, 0) / n_corpus} for i,
                                name in enumerate(source_names)}
    return out


def quality_lines(q: dict) -> list[str]:
    """A few printable lines summarising selection quality."""
    lines = [f"label precision {q['label_precision']:.1%} of marked tokens in toxic-labelled documents "
             f"(corpus {q['label_corpus_share']:.1%})"]
    if not q["target_base_rate"]:  # a filtered corpus: no blocklisted word left to cover
        lines.append("no position predicts a blocklisted word: coverage and enrichment do not apply")
    else:
        lines.append(f"coverage {q['coverage']:.1%} of the positions that predict a blocklisted word "
                     f"({q['target_base_rate']:.2%} of all)")
        if "target_enrichment" in q:
            lines.append(f"target enrichment {q['target_enrichment']:.1f}x above tau")
        lines.append("coverage by word: " + ", ".join(f"{r['word']} {r['covered']:.0%}"
                                                      for r in q["coverage_by_word"][:8]))
    lines.append("frequent marked: " + ", ".join(repr(t) for t, _ in q["frequent_tokens"][:15]))
    return lines
