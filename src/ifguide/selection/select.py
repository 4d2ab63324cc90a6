"""Stage 4 (`ifguide select`): the paper's Algorithm 1 over out-of-core per-token scores.

tau = the exact q-quantile of all scores (linear interpolation, as numpy.quantile). Per block,
s_i = #{j: S_ij > tau} and f_i = sum of those S_ij; both are min-max normalised over blocks and
blocks are ranked by 2 s f / (s + f) (ties: lower block index first). Blocks are walked in rank
order and, for each j > tau in ascending order, the window j-w..j+w (clipped to the block) is
marked; only newly marked tokens count, and the walk stops before the count would pass L.
A marked position j means: penalise the prediction of token j+1 (see objective.py).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..artifacts import Run, Stage, load_array, read_info, write_json, write_text
from ..config import Config, with_overrides
from ..data.lexicon import token_texts
from ..errors import IfguideError
from ..influence import ScoreReader, check_finite
from .quality import load_provenance, quality_lines, selection_quality


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys whose integer order is the float order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def exact_quantile(reader: ScoreReader, q: float) -> float:
    """numpy.quantile(all scores, q) in two streaming passes: a 65,536-bin key histogram, then the bins."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    for start, shard in reader:
        values = np.asarray(shard).ravel()
        check_finite(values, f"scores {reader.path} (shard from block {start})")
        hist += np.bincount((_sortable_keys(values) >> 16).astype(np.int64), minlength=1 << 16)
    n = int(hist.sum())
    position = q * (n - 1)
    ranks = [int(np.floor(position)), min(int(np.floor(position)) + 1, n - 1)]
    cumulative = np.cumsum(hist)
    bins = [int(np.searchsorted(cumulative, r, side="right")) for r in ranks]
    candidates = []
    for _, shard in reader:
        values = np.asarray(shard).ravel()
        candidates.append(values[np.isin(_sortable_keys(values) >> 16, bins)])
    values = np.sort(np.concatenate(candidates).astype(np.float64))
    below = int(cumulative[bins[0] - 1]) if bins[0] > 0 else 0
    lo, hi = values[ranks[0] - below], values[ranks[1] - below]
    frac = position - ranks[0]
    return float(lo + (hi - lo) * frac)


def block_statistics(reader: ScoreReader, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """s_i, f_i per block and the (block, position) of every score above tau, shard by shard."""
    counts, sums, hit_blocks, hit_positions = [], [], [], []
    for start, shard in reader:
        shard = np.asarray(shard, dtype=np.float32)
        above = shard > tau
        counts.append(above.sum(axis=1))
        sums.append(np.where(above, shard, 0).sum(axis=1, dtype=np.float64))
        rows, cols = np.nonzero(above)
        hit_blocks.append(rows + start)
        hit_positions.append(cols)
    return (np.concatenate(counts), np.concatenate(sums), np.concatenate(hit_blocks).astype(np.int64),
            np.concatenate(hit_positions).astype(np.int64))


def _min_max(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x, dtype=np.float64)


def rank_blocks(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Block indices by descending harmonic mean of normalised s and f; ties by block index."""
    sn, fn = _min_max(s.astype(np.float64)), _min_max(f.astype(np.float64))
    total = sn + fn
    harmonic = np.divide(2 * sn * fn, total, out=np.zeros_like(total), where=total > 0)
    return np.lexsort((np.arange(len(s)), -harmonic))


def mark_windows(order: np.ndarray, hit_blocks: np.ndarray, hit_positions: np.ndarray, block_size: int,
                 window: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk blocks in `order`, mark windows around hits, stop before the budget; returns (blocks, positions)."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    walk = np.lexsort((hit_positions, rank[hit_blocks]))
    blocks, positions = hit_blocks[walk], hit_positions[walk]
    starts = np.maximum(positions - window, 0)
    ends = np.minimum(positions + window, block_size - 1)
    first_in_block = np.r_[True, blocks[1:] != blocks[:-1]] if len(blocks) else np.zeros(0, dtype=bool)
    previous_end = np.where(first_in_block, -1, np.r_[-1, ends[:-1]])
    new_starts = np.maximum(starts, previous_end + 1)
    new_counts = np.maximum(ends - new_starts + 1, 0)
    kept = int(np.searchsorted(np.cumsum(new_counts), budget, side="right"))
    new_starts, new_counts, blocks = new_starts[:kept], new_counts[:kept], blocks[:kept]
    marked_blocks = np.repeat(blocks, new_counts)
    offsets = np.arange(int(new_counts.sum())) - np.repeat(np.cumsum(new_counts) - new_counts, new_counts)
    return marked_blocks, np.repeat(new_starts, new_counts) + offsets


def budget_tokens(budget: float, total_tokens: int) -> int:
    """L: a fraction of all tokens (budget <= 1) or an absolute count (budget > 1)."""
    return int(budget * total_tokens) if budget <= 1 else int(budget)


def algorithm1(reader: ScoreReader, quantile: float, window: int, budget: float) -> dict:
    """Run Algorithm 1 over a score reader; returns the marked positions and their statistics."""
    n_blocks, block_size = reader.shape
    tau = exact_quantile(reader, quantile)
    s, f, hit_blocks, hit_positions = block_statistics(reader, tau)
    order = rank_blocks(s, f)
    limit = budget_tokens(budget, n_blocks * block_size)
    blocks, positions = mark_windows(order, hit_blocks, hit_positions, block_size, window, limit)
    sort = np.lexsort((positions, blocks))
    return {"tau": tau, "blocks": blocks[sort], "positions": positions[sort], "order": order,
            "budget_tokens": limit, "s": s, "f": f, "hit_blocks": hit_blocks, "hit_positions": hit_positions}


class MaskLoader:
    """The dense per-block mask (bool, block_size) of a sparse mask artifact, built row by row."""

    def __init__(self, path: Path, expect_blocks: str | None = None):
        info = read_info(path, fingerprinted=False)
        if info is None:
            raise IfguideError(f"{path} holds no finished mask; run `ifguide select` first")
        if expect_blocks is not None and info["blocks_fingerprint"] != expect_blocks:
            raise IfguideError(f"mask {path} was selected on another corpus of blocks "
                               f"({info['blocks_fingerprint']} != {expect_blocks}); select again for this run")
        sparse = load_array(path, "marked.npz")
        self.blocks, self.positions = sparse["blocks"], sparse["positions"]
        self.n_blocks, self.block_size = info["shape"]
        self.pointers = np.searchsorted(self.blocks, np.arange(self.n_blocks + 1))
        self.info = info

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> np.ndarray:
        row = np.zeros(self.block_size, dtype=bool)
        row[self.positions[self.pointers[i]: self.pointers[i + 1]]] = True
        return row


def load_mask(path: Path, expect_blocks: str | None = None) -> MaskLoader:
    """A mask loader; refuses a mask selected on another corpus of blocks."""
    return MaskLoader(path, expect_blocks)


METHODS = ("paper", "blocklist-tokens")


def blocklist_selection(provenance: dict[str, np.ndarray], window: int, budget: float) -> dict:
    """The `blocklist-tokens` mask: windows around every position whose next token is part of a blocklisted word,
    blocks in corpus order, up to the budget (same keys as algorithm1's result, no tau)."""
    n_blocks, block_size = provenance["word"].shape
    hit_blocks, hit_positions = (a.astype(np.int64) for a in np.nonzero(provenance["word"] >= 0))
    limit = budget_tokens(budget, n_blocks * block_size)
    blocks, positions = mark_windows(np.arange(n_blocks), hit_blocks, hit_positions, block_size, window, limit)
    return {"tau": None, "blocks": blocks, "positions": positions, "budget_tokens": limit}


def select(cfg: Config, run: Run, scores_name: str | None, name: str | None = None, quantile: float | None = None,
           window: int | None = None, budget: float | None = None, method: str | None = None,
           force: bool = False) -> Path:
    """`ifguide select`: a mask into RUN/masks/NAME, by Algorithm 1 over scores (`paper`) or by the blocklist.

    `blocklist-tokens` marks, with the same window and budget, the positions whose next token is part of a
    blocklisted word (blocks in corpus order): the token-level lexicon baseline.
    """
    cfg = with_overrides(cfg, "select", quantile=quantile, window=window, budget=budget, method=method)
    quantile, window, budget, method = cfg.select.quantile, cfg.select.window, cfg.select.budget, cfg.select.method
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    if method == "paper":
        if not scores_name:
            raise IfguideError("select --method paper needs --scores MODEL/NAME")
        path = _find_scores(run, scores_name)
        scores = ScoreReader(path)  # one process's scores, or a complete set of parts
        for folder in scores.folders:
            run.check_current(folder, read_info(folder))
        score_info, read = scores.info, (*scores.folders, run.data())
        name = name or path.name
        recipe = {"method": method, "quantile": quantile, "window": window, "budget": budget}
        inputs = {"scores": score_info["fingerprint"], "blocks": score_info["blocks_fingerprint"]}
    else:
        name, score_info, read = name or method, {}, (run.data(),)
        recipe = {"method": method, "window": window, "budget": budget}
        inputs = {"data": data_info["fingerprint"], "blocks": data_info["blocks_fingerprint"]}
    stage = Stage(run.mask(name), "select", recipe, inputs, read)
    if not stage.is_done(force):
        with stage.build() as out:
            from ..data.prepare import load_tokenizer

            provenance = load_provenance(run.data())
            shape = provenance["word"].shape
            if method == "paper":
                reader = ScoreReader(path)
                result = algorithm1(reader, quantile, window, budget)
                hits = (result["hit_blocks"], result["hit_positions"])
            else:
                reader, hits = None, None
                result = blocklist_selection(provenance, window, budget)
            marked_tokens = int(len(result["blocks"]))
            if marked_tokens == 0:
                raise IfguideError(f"select: the mask would be empty (budget {result['budget_tokens']} tokens); "
                                   "raise --budget")
            tok = load_tokenizer(run.data())
            texts = token_texts(tok)
            quality = selection_quality(provenance, (result["blocks"], result["positions"]), hits, texts,
                                        data_info["blocklist_words"], data_info["sources"])
            np.savez(out / "marked.npz", blocks=result["blocks"].astype(np.int64),
                     positions=result["positions"].astype(np.int32))
            info = {"method": method, "tau": result["tau"], "quantile": quantile if method == "paper" else None,
                    "window": window, "budget": budget, "budget_tokens": result["budget_tokens"],
                    "marked_tokens": marked_tokens, "marked_share": marked_tokens / (shape[0] * shape[1]),
                    "blocks_touched": int(len(np.unique(result["blocks"]))), "shape": list(shape),
                    "scores": str(path.relative_to(run.root)) if method == "paper" else None,
                    "blocks_fingerprint": data_info["blocks_fingerprint"], "quality": quality,
                    # which query set steered the mask and which scorer labelled it (never a headline judge)
                    "queries": score_info.get("queries", "rtp") if method == "paper" else None,
                    "labeller": score_info.get("labeller") if method == "paper" else None}
            top = [] if reader is None else [int(b) for b in result["order"][: cfg.select.inspect_blocks]
                                             if result["s"][b] > 0]
            write_text(out / "inspect.html", _html(top, reader, result, run, texts, info))
            write_json(out / "info.json", info)
    _print_summary(read_info(run.mask(name)), run.mask(name))
    return run.mask(name)


def _find_scores(run: Run, scores_name: str) -> Path:
    if "/" in scores_name:
        model, name = scores_name.split("/", 1)
        return run.scores(model, name)
    found = sorted((run.root / "influence").glob(f"*/scores/{scores_name}"))
    if len(found) != 1:
        raise IfguideError(f"scores '{scores_name}' {'not found' if not found else 'is ambiguous'} under "
                           f"{run.root / 'influence'}; pass MODEL/NAME")
    return found[0]


def _html(top: list[int], reader: ScoreReader | None, result: dict, run: Run, texts: list[str], info: dict) -> str:
    """inspect.html: the quality metrics, per-source shares, frequent tokens, and the top blocks highlighted."""
    from ..data.prepare import load_blocks

    q = info["quality"]
    marked = set(zip(result["blocks"].tolist(), result["positions"].tolist()))
    tau = f"tau = {result['tau']:.4g}; " if result["tau"] is not None else ""
    parts = ["<!doctype html><meta charset='utf-8'><title>ifguide selection</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}span.t{white-space:pre-wrap}"
             "span.m{outline:2px solid #b00}td,th{padding:2px 8px;text-align:right}</style>",
             f"<h1>Selected toxic tokens ({html.escape(info['method'])})</h1><p>{tau}{len(result['blocks']):,} tokens "
             f"marked (budget {result['budget_tokens']:,}). Outlined tokens are marked (their prediction is "
             "penalised); red intensity is the token's score.</p><h2>Selection quality</h2><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in quality_lines(q)]
    parts.append("</ul><table><tr><th>word</th><th>positions predicting it</th><th>marked</th></tr>")
    parts += [f"<tr><td>{html.escape(r['word'])}</td><td>{r['targets']}</td><td>{r['covered']:.0%}</td></tr>"
              for r in q["coverage_by_word"]]
    parts.append("</table><h2>Sources</h2><table><tr><th>source</th><th>selected share</th><th>corpus share</th></tr>")
    for name, row in sorted(q["per_source"].items(), key=lambda kv: -kv[1]["selected_share"]):
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{row['selected_share']:.1%}</td>"
                     f"<td>{row['corpus_share']:.1%}</td></tr>")
    parts.append("</table><h2>Most frequent marked tokens</h2><p>")
    parts.append(", ".join(f"<code>{html.escape(repr(t))}</code> ({c})" for t, c in q["frequent_tokens"]))
    parts.append("</p>")
    if top:
        parts.append("<h2>Top-ranked blocks</h2>")
        blocks_ds = load_blocks(run.data())
        sources = read_info(run.data())["sources"]
    for b in top:
        scores = reader.blocks(b, b + 1)[0]
        row = blocks_ds[b]
        peak = max(float(scores.max()), 1e-12)
        source = html.escape(sources[int(row["source_ids"][0])])
        parts.append(f"<h3>block {b} ({source}, s={int(result['s'][b])})</h3><p>")
        for j, token in enumerate(row["input_ids"]):
            # token j is the target of position j-1: colour and outline it by that position's score and mark
            score = float(scores[j - 1]) if j > 0 else 0.0
            alpha = min(max(score / peak, 0.0), 1.0)
            cls = "t m" if (b, j - 1) in marked else "t"
            parts.append(f"<span class='{cls}' style='background:rgba(220,0,0,{alpha:.2f})' "
                         f"title='{score:.3g}'>{html.escape(texts[int(token)])}</span>")
        parts.append("</p>")
    return "".join(parts)


def _print_summary(info: dict, path: Path) -> None:
    tau = f"tau={info['tau']:.4g}, " if info.get("tau") is not None else ""
    print(f"select {info['method']}: {tau}marked {info['marked_tokens']:,} tokens ({info['marked_share']:.2%}; "
          f"budget {info['budget_tokens']:,}) in {info['blocks_touched']:,} blocks")
    for line in quality_lines(info["quality"]):
        print(f"  {line}")
    print(f"  view: {path / 'inspect.html'}")
