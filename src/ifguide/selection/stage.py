"""Stage 4 (`ifguide select`): a mask of training tokens to suppress, by the paper's Algorithm 1 over the
influence scores (algorithm1.py) or whole documents ranked by them (`documents`), by the lexicon
(`blocklist-tokens`), by a scorer's sentence labels (`sentence-labels`, sentences.py) or by the corpus labels
(`labelled-documents`, documents.py); writes marked.npz, its quality and inspect.html."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifacts import Run, Stage, read_info, write_json, write_text
from ..config import Config, with_overrides
from ..data import block_array, sentence_ends, token_texts, training_blocks
from ..errors import IfguideError
from ..influence import ScoreReader
from ..names import SCORED_METHODS
from ..toxicity import get_scorer
from .algorithm1 import algorithm1, budget_tokens, mark_windows
from .documents import document_selection, labelled_document_selection
from .inspect import inspection_html
from .masks import save_mask
from .quality import load_provenance, quality_lines, selection_quality
from .score_sets import find_scores
from .sentences import sentence_selection

log = logging.getLogger(__name__)


def blocklist_selection(provenance: dict[str, np.ndarray], window: int, budget: float) -> dict:
    """The `blocklist-tokens` mask: windows around every position whose next token is part of a blocklisted
    word, blocks in corpus order, up to the budget (same keys as algorithm1's result, no tau)."""
    n_blocks, block_size = provenance["word"].shape
    hit_blocks, hit_positions = (a.astype(np.int64) for a in np.nonzero(provenance["word"] >= 0))
    limit = budget_tokens(budget, n_blocks * block_size)
    blocks, positions = mark_windows(np.arange(n_blocks), hit_blocks, hit_positions, block_size, window,
                                     limit)
    return {"tau": None, "blocks": blocks, "positions": positions, "budget_tokens": limit}


def select(cfg: Config, run: Run, scores_name: str | None, name: str | None = None,
           quantile: float | None = None,
           window: int | None = None, budget: float | None = None, method: str | None = None,
           force: bool = False) -> Path:
    """`ifguide select`: a mask into RUN/masks/NAME, by Algorithm 1 over scores (`paper`), by whole documents,
    or by the blocklist.

    `documents` marks whole documents by descending mean score up to the budget; `labelled-documents` every
    document labelled toxic or hit by the blocklist (the `clean` reference's complement).
    `blocklist-tokens` marks, with the same window and budget, the positions whose next token is part of a
    blocklisted word (blocks in corpus order): the token-level lexicon baseline. `sentence-labels` marks every
    sentence `select.sentence_scorer` scores at least `select.sentence_threshold`, with no budget. A mask
    indexes the blocks its scores cover: the full corpus's, or the filtered corpus's (`ifguide scores --data
    filter`).
    """
    cfg = with_overrides(cfg, "select", quantile=quantile, window=window, budget=budget, method=method)
    quantile, window = cfg.select.quantile, cfg.select.window
    budget, method = cfg.select.budget, cfg.select.method
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    if method in SCORED_METHODS:
        path = find_scores(run, scores_name)
        scores = ScoreReader(path)  # one process's scores, or a complete set of parts
        for folder in scores.folders:
            run.check_current(folder, read_info(folder))
        score_info, read = scores.info, (*scores.folders, run.data())
        name = name or path.name
        recipe = {"method": method, "budget": budget} | (
            {"quantile": quantile, "window": window} if method == "paper" else {})
        inputs = {"scores": score_info["fingerprint"], "blocks": score_info["blocks_fingerprint"]}
        data = score_info.get("data", "full")
    else:
        name, score_info, read, data = name or method, {}, (run.data(),), "full"
        recipe = {"method": method} | (
            {"window": window, "budget": budget} if method == "blocklist-tokens" else
            {"scorer": cfg.select.sentence_scorer, "threshold": cfg.select.sentence_threshold}
            if method == "sentence-labels" else {})
        inputs = {"data": data_info["fingerprint"], "blocks": data_info["blocks_fingerprint"]}
    block_set, blocks_fp = training_blocks(data_info, data)
    stage = Stage(run.mask(name), "select", recipe, inputs, read)
    built = not stage.is_done(force)
    if built:
        with stage.build() as out:
            from ..data import load_documents, load_tokenizer

            provenance = load_provenance(run.data(), block_set)
            shape = provenance["word"].shape
            tok = load_tokenizer(run.data())
            texts = token_texts(tok)
            reader, hits, labeller = None, None, score_info.get("labeller")
            if method == "paper":
                reader = ScoreReader(path)
                result = algorithm1(reader, quantile, window, budget)
                hits = (result["hit_blocks"], result["hit_positions"])
            elif method == "documents":
                result = document_selection(ScoreReader(path), provenance["doc"], budget)
            elif method == "labelled-documents":
                documents = load_documents(run.data()).with_format("numpy")
                result = labelled_document_selection(provenance["doc"], np.asarray(documents["toxic_label"]),
                                                     np.asarray(documents["blocklisted"]))
                labeller = "corpus labels"
            elif method == "blocklist-tokens":
                result = blocklist_selection(provenance, window, budget)
            else:
                labeller = cfg.select.sentence_scorer
                scorer = get_scorer(labeller)
                result = sentence_selection(block_array(run), sentence_ends(texts, tok.eos_token_id),
                                            tok.decode,
                                            scorer.score, cfg.select.sentence_threshold)
                log.info(f"select sentence-labels: {result['toxic_sentences']:,} of {result['sentences']:,} "
                         f"sentences scored >= {cfg.select.sentence_threshold:g} by {labeller}")
            marked_tokens = int(len(result["blocks"]))
            if marked_tokens == 0:
                raise IfguideError("select: the mask would be empty (budget "
                                   f"{result['budget_tokens']} tokens); "
                                   + ("lower select.sentence_threshold" if method == "sentence-labels"
                                      else "raise --budget" if method != "labelled-documents"
                                      else "the corpus has no labelled or blocklisted document"))
            quality = selection_quality(provenance, (result["blocks"], result["positions"]), hits, texts,
                                        data_info["blocklist_words"], data_info["sources"])
            save_mask(out, result["blocks"], result["positions"])
            info = {"method": method, "tau": result["tau"], "quantile": quantile if method == "paper"
                    else None, "documents": result.get("documents"),
                    "window": window, "budget": budget, "budget_tokens": result["budget_tokens"],
                    "marked_tokens": marked_tokens, "marked_share": marked_tokens / (shape[0] * shape[1]),
                    "blocks_touched": int(len(np.unique(result["blocks"]))), "shape": list(shape),
                    "scores": str(path.relative_to(run.root)) if method in SCORED_METHODS else None,
                    "blocks_fingerprint": blocks_fp, "data": data, "quality": quality,
                    # which query set steered the mask and which scorer labelled it (never a headline judge)
                    "queries": score_info.get("queries", "rtp") if method in SCORED_METHODS else None,
                    "labeller": labeller}
            top = [] if method != "paper" else [int(b) for b in result["order"][: cfg.select.inspect_blocks]
                                             if result["s"][b] > 0]
            write_text(out / "inspect.html", inspection_html(top, reader, result, run, texts, info))
            write_json(out / "info.json", info)
    # a mask built now is summarised; one up to date only with --verbose
    _print_summary(read_info(run.mask(name)), run.mask(name), logging.INFO if built else logging.DEBUG)
    return run.mask(name)


def _print_summary(info: dict, path: Path, level: int) -> None:
    tau = f"tau={info['tau']:.4g}, " if info.get("tau") is not None else ""
    log.log(level, f"select {info['method']}: {tau}marked {info['marked_tokens']:,} tokens "
            f"({info['marked_share']:.2%}; budget {info['budget_tokens']:,}) in "
            f"{info['blocks_touched']:,} blocks")
    for line in quality_lines(info["quality"]):
        log.log(level, f"  {line}")
    log.log(level, f"  view: {path / 'inspect.html'}")
