"""Stage 6 (`ifguide report`): results tables (markdown, JSON, HTML) from tables.py, the
toxicity-vs-perplexity plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import Run, finished, write_json, write_text
from ..data import blocklist_pattern
from ..errors import IfguideError
from ..names import REFERENCE, RIVALS, row_order, split_sweep_point
from .human import human_text
from .stage import PERPLEXITY_SETS
from .tables import (
    check_targets,
    comparable_evaluations,
    evaluated_sets,
    floor_table,
    lambada_table,
    method_table,
    query_labellers,
    rad_slowdown,
)

LABELLED = "‡"  # marks a row whose queries the table's scorer labelled
SET_TITLES = {"rtp": "RealToxicityPrompts", "bold": "BOLD prompts", "attaq": "AttaQ adversarial questions",
              "toxigen": "ToxiGen prompts"}


def _pct(cell: dict, signed: bool = False) -> str:
    f = (lambda x: f"{x:+.1%}") if signed else (lambda x: f"{x:.1%}")
    return f"{f(cell['value'])} [{f(cell['ci'][0])}, {f(cell['ci'][1])}]"


def _diff(cell: dict) -> str:
    return f"{cell['value']:+.3f} [{cell['ci'][0]:+.3f}, {cell['ci'][1]:+.3f}]"


def _target_lines(targets: dict, scorer: str, goals: bool) -> list[str]:
    """Each IF-Guide row against the baseline, the floor and the rivals, with paired 95% intervals; `goals`
    adds the project's own targets (the demo)."""
    def goal(text: str) -> str:
        return f" (target {text})" if goals else ""

    lines = []
    for method, t in targets.items():
        lines += ["", f"## {method} against the baseline", ""]
        if t.get("labelled_by_this_scorer"):
            lines.append(f"- not judged here: {scorer} labelled this row's queries")
            continue
        if "removed_share" in t:
            lines.append(f"- removed share of the baseline's EMT above `{REFERENCE}`: "
                         f"{_pct(t['removed_share'])}{goal('>= 100%')}")
        lines += [f"- EMT reduction: {t['emt_reduction_x']:.2f}x",
                  f"- share >= 0.5 reduction: {t['share_reduction_x']:.2f}x",
                  f"- held-out perplexity change: {t['heldout_ppl_rise']:+.1%}{goal('<= +1%')}"]
        if "blocklisted_minus_filter" in t:
            lines.append(f"- samples holding a blocklisted word: {_pct(t['blocklisted_share'])}, minus "
                         f"`filter`'s: {_pct(t['blocklisted_minus_filter'], True)} (the blocklist "
                         "defines the filter)")
        lines += [f"- beats `{rival}` on EMT: {t[f'beats_{rival}_on_emt']}"
                  + (f" (EMT minus filter's {_diff(t['emt_minus_filter'])})" if rival == "filter" else "")
                  for rival in RIVALS if f"beats_{rival}_on_emt" in t]
        if "dominates_filter" in t:
            lines.append("- dominates `filter` (lower EMT, held-out perplexity below): "
                         f"{t['dominates_filter']}")
        if "with_rad_below_rad" in t:
            lines.append(f"- `{method}+rad` below `rad` on EMT: {t['with_rad_below_rad']}")
    if lines:
        lines += ["", "Verdicts: yes when the 95% paired interval of the EMT difference lies below zero, no "
                  "when above, tie when it holds zero (prompts resampled, seeds averaged per prompt)."]
    return lines


FLOOR_NOTE = (f"Removed share: (baseline - method) / (baseline - {REFERENCE}) of EMT. `{REFERENCE}` "
              "trains the baseline's steps on the documents neither labelled toxic nor blocklisted: a "
              "reference built from the labels, not a method. Brackets: 95% paired bootstrap intervals over "
              "prompts (seeds averaged per prompt). Blocklisted: the samples holding a blocklisted word, the "
              "lexicon that defines the filter.")


def floor_markdown(floor: dict, human: dict | None, scorer: str) -> list[str]:
    """The effects against the clean floor, one row per method, and the human-text line."""
    if not floor:
        return []
    lines = ["", f"## Against the floor, scorer {scorer}", "", FLOOR_NOTE, "",
             "| method | removed share | EMT - baseline | EMT - filter | blocklisted | blocklisted - filter "
             "|",
             "|---|---|---|---|---|---|"]
    for m in sorted(floor, key=row_order):
        r = floor[m]
        cells = [_pct(r["removed_share"]) if "removed_share" in r else "-",
                 _diff(r["emt_minus_baseline"]) if "emt_minus_baseline" in r else "-",
                 _diff(r["emt_minus_filter"]) if "emt_minus_filter" in r else "-",
                 _pct(r["blocklisted_share"]),
                 _pct(r["blocklisted_minus_filter"], True) if "blocklisted_minus_filter" in r else "-"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if human:
        lines += ["", f"Human text: EMT {human['emt']:.3f}, blocklisted {human['blocklisted_share']:.1%} "
                  f"({human['windows']:,} windows of {human['tokens']} tokens from the held-out benign "
                  "pages, scored under the eval protocol with no model: this scorer's floor)."]
    return lines


def _name(method: str, scorer: str, labellers: dict[str, set[str]]) -> str:
    return f"{method} {LABELLED}" if scorer in labellers.get(method, ()) else method


def _labelled_note(table: dict, scorer: str, labellers: dict[str, set[str]]) -> list[str]:
    marked = [m for m in table if scorer in labellers.get(m, ())]
    return ["", f"{LABELLED} {', '.join(marked)}: {scorer} labelled the queries of this row's mask, so it is "
            "not an independent judge of this row."] if marked else []


def _fmt(cell: dict, pct: bool = False) -> str:
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(cell['value'])} [{f(cell['ci'][0])}, {f(cell['ci'][1])}]"


def _cell(row: dict, group: str, metric: str, pct: bool = False) -> str:
    return _fmt(row[group][metric], pct) if group in row else "-"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


MARKED_WORDS = {"mask": "masked", "conditional": "conditioned"}  # what an objective does to a marked token


def _tokens_off(share: dict) -> str:
    """`dropped 41.0%`, `penalised 2.0%` (`masked`, `conditioned` by objective), both, or `-` (a method that
    changes no training token)."""
    words = {"dropped": "dropped", "penalised": MARKED_WORDS.get(share.get("objective"), "penalised")}
    parts = [f"{words[kind]} {share[kind]:.1%}" for kind in words if share.get(kind)]
    return ", ".join(parts) or "-"


def _epochs_note(table: dict) -> list[str]:
    """Every row trains the baseline's steps, a matched-tokens row more; a row on fewer (filter) or more
    blocks sees another share of an epoch. A fine-tuned row (dpo) records no epochs and is not named."""
    base = table.get("baseline", {})
    rows = sorted(table.items(), key=lambda kv: row_order(kv[0]))
    other = {m: r["epochs"] for m, r in rows
             if r.get("epochs") and base.get("epochs") and abs(r["epochs"] - base["epochs"]) > 0.005}
    longer = {m: r["steps"] for m, r in rows if r.get("epochs") and r.get("steps") and base.get("steps")
              and r["steps"] > base["steps"]}
    if not other and not longer:
        return []
    steps = f"{base['steps']} steps" + (
        ", except " + ", ".join(f"{m} ({s})" for m, s in longer.items())
        + ", trained until they learned as many tokens as the filter" if longer else "")
    return ["", f"Every model trains {steps}; on its own blocks that is {base['epochs']:.2f} epochs for "
            "the baseline" + "".join(f", {e:.2f} for {m}" for m, e in other.items()) + "."]


def comparison_markdown(table: dict, lambada: dict, targets: dict, prompts: str, scorer: str,
                        labellers: dict[str, set[str]], goals: bool = False, floor: dict | None = None,
                        human: dict | None = None) -> str:
    """The paper's table: EMT / TP on all, toxic and non-toxic prompts, held-out perplexity, LAMBADA."""
    lines = [f"# {SET_TITLES.get(prompts, prompts)}: comparison, scorer {scorer}", "",
             "Averaged over training seeds; brackets are 95% bootstrap intervals over prompts. RAD is a "
             "decoding method: perplexity is not defined for it (n/a), and its LAMBADA figure would be its "
             "base model's. LAMBADA: last-word / last-token accuracy.", "",
             "Perplexity on held-out pages of the whole training distribution (as the paper's OpenWebText "
             "test split), on the benign ones among them (neither labelled toxic nor hit by the blocklist), "
             "on those the blocklist filter would have dropped, and on WikiText-2. Tokens off: the share of "
             "training tokens a method drops (filter), penalises (ascent, unlikelihood), leaves out of the "
             "loss (masked) or learns after <|misaligned|> (conditioned).", "",
             "| method | seeds | EMT | TP | EMT toxic | TP toxic | EMT non-toxic | TP non-toxic | share >= "
             "0.5 | ppl held-out | ppl benign | ppl blocklisted | ppl WikiText-2 | LAMBADA | tokens off |",
             "|" + "---|" * 15]
    for m in sorted(table, key=row_order):
        r = table[m]
        ppl = (" | ".join(_ppl(r["perplexity"].get(k)) for k in PERPLEXITY_SETS) if r["perplexity"]
               else " | ".join(["n/a"] * len(PERPLEXITY_SETS)))
        acc = (f"{lambada[m]['last_word']:.1%} / "
               f"{lambada[m]['last_token']:.1%}" if m in lambada and r["perplexity"]
               else "n/a" if not r["perplexity"] else "-")
        lines.append(f"| {_name(m, scorer, labellers)} | {r['seeds']} | {_cell(r, 'all', 'emt')} | "
                     f"{_cell(r, 'all', 'tp')} | {_cell(r, 'toxic', 'emt')} | {_cell(r, 'toxic', 'tp')} | "
                     f"{_cell(r, 'nontoxic', 'emt')} | {_cell(r, 'nontoxic', 'tp')} | "
                     f"{_cell(r, 'all', 'share', True)} | {ppl} | {acc} | "
                     f"{_tokens_off(r.get('token_share') or {})} |")
    if lambada:
        any_row = next(iter(lambada.values()))
        lines += ["", f"LAMBADA: {any_row['passages']:,} passages of the test set; contexts longer than the "
                  "model's block are cut from the left."]
    lines += _epochs_note(table) + _labelled_note(table, scorer, labellers)
    lines += floor_markdown(floor or {}, human, scorer)
    lines += _target_lines(targets, scorer, goals)
    return "\n".join(lines) + "\n"


def set_markdown(table: dict, prompts: str, scorer: str, labellers: dict[str, set[str]]) -> str:
    """One prompt set (BOLD, AttaQ, ToxiGen) under one scorer: EMT, TP, mean score and share per method."""
    title = f"{SET_TITLES.get(prompts, prompts)}, scorer {scorer}"
    if (prompts, scorer) == ("toxigen", "toxigen"):
        title = "Implicit toxicity: ToxiGen prompts, scorer toxigen"
    lines = [f"# {title}", "", "| method | seeds | EMT | TP | mean score | share >= 0.5 |",
             "|---|---|---|---|---|---|"]
    for m in sorted(table, key=row_order):
        r = table[m]
        lines.append(f"| {_name(m, scorer, labellers)} | {r['seeds']} | {_fmt(r['all']['emt'])} | "
                     f"{_fmt(r['all']['tp'])} | {r['all']['mean']['value']:.3f} | "
                     f"{_fmt(r['all']['share'], True)} |")
    return "\n".join(lines + _labelled_note(table, scorer, labellers)) + "\n"


def _plot(table: dict, path: Path, scorer: str, human: dict | None = None) -> None:
    """EMT against held-out perplexity, one colour per method family: `ifguide sweep` points (MASK-L0.04-lam2)
    share their mask's colour and carry their operating point as a label, so the frontier can be read off; a
    dashed line marks human text's EMT, the scorer's floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colours: dict[str, str] = {}
    for method, r in sorted(table.items(), key=lambda kv: row_order(kv[0])):
        emt = r["all"]["emt"]
        yerr = [[emt["value"] - emt["ci"][0]], [emt["ci"][1] - emt["value"]]]
        base = "baseline" if method == "rad" else method.removesuffix("+rad")
        ppl = r["perplexity"] or (table.get(base) or {}).get("perplexity")
        if ppl is None:
            continue
        decoding = not r["perplexity"]  # RAD: drawn hollow at its base model's perplexity
        family, point = split_sweep_point(method)
        label = None if family in colours else (f"{family} (at {base}'s ppl)" if decoding else family)
        bar = ax.errorbar(ppl["heldout"], emt["value"], yerr=yerr, fmt="o", capsize=3,
                          color=colours.get(family),
                          mfc="none" if decoding else None, label=label)
        colours.setdefault(family, bar.lines[0].get_color())
        if point:
            ax.annotate(point.lstrip("-").replace("-", " "), (ppl["heldout"], emt["value"]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points", color=colours[family])
    if human:
        ax.axhline(human["emt"], linestyle="--", color="grey", linewidth=1, label="human text (no model)")
    ax.set_xlabel("held-out perplexity (lower is better)")
    ax.set_ylabel(f"Expected Maximum Toxicity ({scorer})")
    ax.set_title("Toxicity vs fluency (sweep points labelled by budget and lambda)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never hides a point
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # the title and the outside legend stay in the image
    plt.close(fig)
    tmp.replace(path)


DEMO_MARKER = "demo.json"  # written by `ifguide demo`: its report states the project's own targets


def report(run: Run, timings: dict | None = None) -> str:
    """Write RUN/report/{results.md, results.json, results.html, toxicity_vs_perplexity.png}; return the
    markdown.

    One table per prompt set and scorer; RTP under the first configured scorer is the plot and the comparison
    with the baseline, which states the project's targets only in a run `ifguide demo` made.
    """
    cfg = run.load_config()
    goals = (run.root / DEMO_MARKER).is_file()
    sets = evaluated_sets(run)
    sets.pop("lambada", None)  # accuracy, not toxicity: a column of the comparison table
    if not sets:
        raise IfguideError(f"no evaluations under {run.root / 'eval'}; run `ifguide eval` first")
    main_prompts = "rtp" if "rtp" in sets else sorted(sets)[0]
    labellers = query_labellers(run)
    labelling = set().union(*labellers.values())
    # the headline scorer: the first configured one that labelled no row's queries (else the first at all)
    candidates = [s for s in cfg.eval.scorers if s in sets[main_prompts]] or sets[main_prompts]
    main_scorer = next((s for s in candidates if s not in labelling), candidates[0])
    lambada = lambada_table(run)
    blocklist = blocklist_pattern(run.require(run.data(), "run `ifguide prepare` first")["blocklist_words"])
    tables, sections = {}, []
    for prompts in sorted(sets, key=lambda name: (name != main_prompts, name)):
        for scorer in sorted(sets[prompts], key=lambda name: (name != main_scorer, name in labelling)):
            table = method_table(run, prompts, scorer, cfg.eval.bootstrap, cfg.eval.toxic_threshold)
            floor, human = {}, None
            if prompts == main_prompts and table:
                floor = floor_table(run, prompts, scorer, blocklist, cfg.eval.bootstrap)
                human = human_text(run, cfg, scorer, next(iter(table.values()))["prompts"], blocklist)
            targets = check_targets(table, floor, scorer, labellers) if prompts == main_prompts else {}
            left_out = comparable_evaluations(run, prompts, scorer)[1]
            tables[f"{prompts}/{scorer}"] = {"methods": table, "targets": targets, "left_out": left_out,
                                             "floor": floor, "human_text": human,
                                             "labelled_rows": sorted(m for m in table
                                                                     if scorer in labellers.get(m, ()))}
            body = (comparison_markdown(table, lambada, targets, prompts, scorer, labellers, goals, floor,
                                        human)
                    if prompts == main_prompts else set_markdown(table, prompts, scorer, labellers))
            sections.append(body + "".join(f"\nLeft out: {line}\n" for line in left_out))
    text = "\n".join(sections)
    slowdown = rad_slowdown(run, main_prompts)
    if slowdown:
        text += ("\n## Decoding cost\n\n" + "".join(
            f"- {method}: {ratio:.2f}x the generation time of plain sampling from the same model\n"
            for method, ratio in slowdown.items()))
    if timings:
        text += "\n## Wall time per stage\n\n" + "".join(f"- {k}: {v:.0f}s\n" for k, v in timings.items())
    masks = [p.relative_to(run.root) for p in finished(run.root.glob("masks/*/inspect.html"))]
    text += "\n## Selection views\n\n" + "".join(f"- [{m.parent.name}](../{m})\n" for m in masks)
    out = run.report()
    main = tables[f"{main_prompts}/{main_scorer}"]
    _plot(main["methods"], out / "toxicity_vs_perplexity.png", main_scorer, main["human_text"])
    text += "\n![toxicity vs perplexity](toxicity_vs_perplexity.png)\n"
    write_text(out / "results.md", text)
    write_json(out / "results.json", {"tables": tables, "lambada": lambada, "rad_slowdown": slowdown,
                                      "main": f"{main_prompts}/{main_scorer}",
                                      "query_labellers": {m: sorted(v) for m, v in labellers.items()},
                                      "timings_s": timings or {}, "selection_views": [str(m) for m in masks]})
    write_text(out / "results.html", _html(text, out / "toxicity_vs_perplexity.png"))
    return text


def _verdict_line(method: str, t: dict, scorer: str) -> str:
    """One IF-Guide row's effect and verdicts on one line."""
    if t.get("labelled_by_this_scorer"):
        return f"{method}, {scorer}: not judged ({scorer} labelled its queries)"
    parts = [f"removed {_pct(t['removed_share'])} of the gap to {REFERENCE}"] if "removed_share" in t else []
    parts.append(f"ppl {t['heldout_ppl_rise']:+.1%}")
    beats = [f"{rival} {t[f'beats_{rival}_on_emt']}" for rival in RIVALS if f"beats_{rival}_on_emt" in t]
    parts += [f"beats {', '.join(beats)}"] if beats else []
    parts += [f"dominates filter {t['dominates_filter']}"] if "dominates_filter" in t else []
    return f"{method}, {scorer}: " + "; ".join(parts)


def headline(run: Run) -> str:
    """What `report` and `demo` print: the main table's EMT and held-out perplexity per method, the verdicts
    against the baseline, and where the full report is."""
    results = json.loads((run.report() / "results.json").read_text())
    prompts, scorer = results["main"].split("/")
    main = results["tables"][results["main"]]
    width = max(len(m) for m in main["methods"]) + 2
    lines = [f"{SET_TITLES.get(prompts, prompts)}, scorer {scorer}: EMT [95% interval], held-out perplexity"]
    for method in sorted(main["methods"], key=row_order):
        row = main["methods"][method]
        ppl = row["perplexity"].get("heldout") if row["perplexity"] else None
        lines.append(f"  {method:{width}} EMT {_cell(row, 'all', 'emt')}   ppl {_ppl(ppl)}")
    # the verdicts under every scorer that labelled no row (the headline scorers), the main one first
    judges = [key for key, table in results["tables"].items() if key.startswith(f"{prompts}/")
              and table["targets"] and not table["labelled_rows"]]
    for key in sorted(judges, key=lambda k: k != results["main"]):
        targets = results["tables"][key]["targets"]
        lines += [_verdict_line(method, t, key.split("/")[1]) for method, t in targets.items()]
    if main["targets"]:
        lines.append("(verdicts: 95% paired intervals of the EMT difference; tie when they hold zero)")
    lines.append(f"full report: {run.report() / 'results.md'} (and .html, .json); --verbose prints it")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:90em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #bbb;padding:3px 6px}
th{background:#eee;text-align:left}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 2px}
@media print{body{max-width:none;margin:0;font-size:9pt}table{page-break-inside:avoid;font-size:8pt}
h1,h2{page-break-after:avoid}a{color:inherit;text-decoration:none}}"""


def _html(markdown_text: str, plot: Path) -> str:
    """The markdown report as a standalone HTML page: tables rendered by markdown-it, the plot embedded."""
    import base64

    from markdown_it import MarkdownIt

    image = f"data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}"
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(
        markdown_text.replace(f"]({plot.name})", f"]({image})"))
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>ifguide results</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")
