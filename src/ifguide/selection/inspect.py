"""inspect.html: what a mask marked, for a reader to check by eye."""

from __future__ import annotations

import html

from ..artifacts import Run, read_info
from ..influence import ScoreReader
from .quality import quality_lines


def inspection_html(top: list[int], reader: ScoreReader | None, result: dict, run: Run, texts: list[str],
                    info: dict) -> str:
    """inspect.html: the quality metrics, per-source shares, frequent tokens, and the top blocks
    highlighted."""
    from ..data import TRAINING_DATA, load_blocks

    q = info["quality"]
    marked = set(zip(result["blocks"].tolist(), result["positions"].tolist()))
    tau = f"tau = {result['tau']:.4g}; " if result["tau"] is not None else ""
    parts = ["<!doctype html><meta charset='utf-8'><title>ifguide selection</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}span.t{white-space:pre-wrap}"
             "span.m{outline:2px solid #b00}td,th{padding:2px 8px;text-align:right}</style>",
             "<h1>Selected toxic tokens "
             f"({html.escape(info['method'])})</h1><p>{tau}{len(result['blocks']):,} tokens marked (budget "
             f"{result['budget_tokens']:,}). Outlined tokens are marked (their prediction is penalised); red "
             "intensity is the token's score.</p><h2>Selection quality</h2><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in quality_lines(q)]
    parts.append("</ul><table><tr><th>word</th><th>positions predicting it</th><th>marked</th></tr>")
    parts += [f"<tr><td>{html.escape(r['word'])}</td><td>{r['targets']}</td><td>{r['covered']:.0%}</td></tr>"
              for r in q["coverage_by_word"]]
    parts.append("</table><h2>Sources</h2><table><tr><th>source</th><th>selected share</th><th>corpus "
                 "share</th></tr>")
    for name, row in sorted(q["per_source"].items(), key=lambda kv: -kv[1]["selected_share"]):
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{row['selected_share']:.1%}</td>"
                     f"<td>{row['corpus_share']:.1%}</td></tr>")
    parts.append("</table><h2>Most frequent marked tokens</h2><p>")
    parts.append(", ".join(f"<code>{html.escape(repr(t))}</code> ({c})" for t, c in q["frequent_tokens"]))
    parts.append("</p>")
    if top:
        parts.append("<h2>Top-ranked blocks</h2>")
        blocks_ds = load_blocks(run.data(), TRAINING_DATA[info["data"]])
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
