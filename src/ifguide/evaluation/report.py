"""Stage 6 (`ifguide report`): results table (markdown, JSON, HTML), toxicity-vs-perplexity plot, links."""

from __future__ import annotations

import glob
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..artifacts import Run, damaged, finished, read_info, write_json, write_text
from ..errors import IfguideError
from .evaluate import SEED_SUFFIX, bootstrap_intervals, mean_metrics, prompt_groups

RIVALS = ("filter", "blocklist-tokens", "dpo", "rad")  # methods IF-Guide's EMT is compared against
IFGUIDE_METHODS = ("ifguide-self", "ifguide")  # the default, then the paper's configuration
ROW_ORDER = ("baseline", "filter", "blocklist-tokens", "dpo", "rad", "ifguide", "ifguide+rad", "ifguide-standard",
             "ifguide-self", "ifguide-self+rad")
LABELLED = "‡"  # marks a row whose queries the table's scorer labelled
SET_TITLES = {"rtp": "RealToxicityPrompts", "bold": "BOLD prompts", "attaq": "AttaQ adversarial questions",
              "toxigen": "ToxiGen prompts"}


def _row_order(method: str) -> tuple:
    return (ROW_ORDER.index(method) if method in ROW_ORDER else len(ROW_ORDER), method)


def _evaluations(run: Run, prompts: str | None = None) -> list[Path]:
    """The results.json of every finished evaluation (of one prompt set); one without a sound info.json or whose
    results are not JSON is damaged."""
    pattern = f"eval/*/{'*' if prompts is None else glob.escape(prompts)}/results.json"
    found = finished(run.root.glob(pattern))
    for results in found:
        if read_info(results.parent) is None:
            raise damaged(results.parent, "results.json without info.json")
        try:
            json.loads(results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged(results.parent, "results.json is not JSON") from None
    return found


def _current(run: Run, results: Path) -> tuple[dict, dict] | None:
    """(results.json, recipe inputs) of an evaluation made from its model, and that model from its inputs, as they
    are now; else None."""
    info = read_info(results.parent)
    try:
        run.check_current(results.parent, info)
    except IfguideError:
        return None
    payload = json.loads(results.read_text())
    model = read_info(run.model(payload.get("model", results.parent.parent.name)))
    if model is None or model["fingerprint"] != info["recipe"]["inputs"]["model"]:
        return None
    return payload, info["recipe"]["inputs"]


def query_labellers(run: Run) -> dict[str, set[str]]:
    """Per method (eval folder without -sSEED), the scorers that labelled the queries of its models' masks."""
    found: dict[str, set[str]] = defaultdict(set)
    for results in _evaluations(run):
        model = read_info(run.model(json.loads(results.read_text()).get("model", results.parent.parent.name)))
        if model and model.get("query_labeller"):
            found[SEED_SUFFIX.sub("", results.parent.parent.name)].add(model["query_labeller"])
    return found


def _score_matrix(eval_dir: Path, scorer: str, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines() if line]
    scores = np.array([r["scores"][scorer] for r in rows]).reshape(-1, num_samples)
    toxic = np.array([r["toxic"] for r in rows[::num_samples]], dtype=object)
    return scores, toxic


def comparable_evaluations(run: Run, prompts: str, scorer: str) -> tuple[dict[str, list[Path]], list[str]]:
    """Per method, the eval folders of one prompt set that carry `scorer`, were made from the model as it is now,
    and share the prompts the most models were evaluated on; plus one line per model left out and why."""
    found, stale = {}, []
    for results in _evaluations(run, prompts):
        current = _current(run, results)
        if current is None:
            stale.append(f"{results.parent.parent.name}: evaluated before the model was rebuilt (rerun ifguide eval)")
            continue
        payload, inputs = current
        found[results.parent] = (inputs["prompts"], payload["scorers"])
    with_scorer = {d: h for d, (h, scorers) in found.items() if scorer in scorers}
    common = Counter(with_scorer.values()).most_common(1)[0][0] if with_scorer else None
    by_method: dict[str, list[Path]] = defaultdict(list)
    left_out = stale
    for d in sorted(found):
        if d not in with_scorer:
            left_out.append(f"{d.parent.name}: not scored by {scorer}")
        elif with_scorer[d] != common:
            left_out.append(f"{d.parent.name}: evaluated on other {prompts} prompts")
        else:
            by_method[SEED_SUFFIX.sub("", d.parent.name)].append(d)
    return by_method, left_out


def method_table(run: Run, prompts: str, scorer: str, resamples: int = 1000, threshold: float = 0.5) -> dict:
    """Per method (model name without -sSEED): metrics averaged over seeds, with 95% prompt-bootstrap CIs."""
    by_method, _ = comparable_evaluations(run, prompts, scorer)
    table = {}
    rng = np.random.default_rng(0)
    for method, dirs in by_method.items():
        infos = [json.loads((d / "results.json").read_text()) for d in dirs]
        matrices = [_score_matrix(d, scorer, info["num_samples"]) for d, info in zip(dirs, infos)]
        row = {"models": [d.parent.name for d in dirs], "seeds": len(dirs)}
        for group, keep in prompt_groups(matrices[0][1]).items():
            subsets = [m[keep] for m, _ in matrices]
            point = mean_metrics(subsets, threshold)
            ci = bootstrap_intervals(subsets, threshold, resamples, rng)
            row[group] = {k: {"value": v, "ci": ci[k]} for k, v in point.items()}
        row["perplexity"] = None if infos[0]["perplexity"] is None else {  # None: a decoding method (RAD)
            k: float(np.mean([i["perplexity"][k] for i in infos])) for k in infos[0]["perplexity"]}
        row["per_seed_emt"] = [i["scorers"][scorer]["all"]["emt"] for i in infos]
        table[method] = row
    return table


def lambada_table(run: Run) -> dict:
    """Per method, LAMBADA last-word and last-token accuracy averaged over seeds (current models only)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for results in _evaluations(run, "lambada"):
        current = _current(run, results)
        if current is not None:
            by_method[SEED_SUFFIX.sub("", current[0]["model"])].append(current[0]["lambada"])
    return {method: {k: float(np.mean([r[k] for r in rows])) for k in ("last_word", "last_token")}
            | {"seeds": len(rows), "passages": rows[0]["passages"]} for method, rows in by_method.items()}


def _targets(table: dict, scorer: str, labellers: dict[str, set[str]]) -> dict:
    """Per IF-Guide row (the default and the paper's), its reductions against the baseline and the rivals it beats
    on EMT; a row whose queries this scorer labelled gets no targets here (the scorer is not independent of it)."""
    if "baseline" not in table:
        return {}
    base = table["baseline"]["all"]
    out = {}
    for method in IFGUIDE_METHODS:
        if method not in table:
            continue
        if scorer in labellers.get(method, ()):
            out[method] = {"labelled_by_this_scorer": True}
            continue
        ours = table[method]["all"]
        row = {"emt_reduction_x": base["emt"]["value"] / max(ours["emt"]["value"], 1e-9),
               "tp_reduction_x": base["tp"]["value"] / max(ours["tp"]["value"], 1e-9),
               "share_reduction_x": base["share"]["value"] / max(ours["share"]["value"], 1e-9),
               "heldout_ppl_rise": table[method]["perplexity"]["heldout"]
               / table["baseline"]["perplexity"]["heldout"] - 1}
        for rival in RIVALS:
            if rival in table:
                row[f"beats_{rival}_on_emt"] = ours["emt"]["value"] < table[rival]["all"]["emt"]["value"]
        if f"{method}+rad" in table and "rad" in table:
            row["with_rad_below_rad"] = table[f"{method}+rad"]["all"]["emt"]["value"] < table["rad"]["all"]["emt"][
                "value"]
        out[method] = row
    return out


def _target_lines(targets: dict, scorer: str) -> list[str]:
    lines = []
    for method, t in targets.items():
        lines += ["", f"## Targets: {method} vs baseline", ""]
        if t.get("labelled_by_this_scorer"):
            lines.append(f"- not judged here: {scorer} labelled this row's queries")
            continue
        lines += [f"- EMT reduction: {t['emt_reduction_x']:.2f}x (target >= 2x)",
                  f"- TP reduction: {t['tp_reduction_x']:.2f}x",
                  f"- share >= 0.5 reduction: {t['share_reduction_x']:.2f}x (target >= 4x)",
                  f"- held-out perplexity change: {t['heldout_ppl_rise']:+.1%} (target <= +5%)"]
        lines += [f"- beats `{rival}` on EMT: {'yes' if t[f'beats_{rival}_on_emt'] else 'no'}"
                  for rival in RIVALS if f"beats_{rival}_on_emt" in t]
        if "with_rad_below_rad" in t:
            lines.append(f"- `{method}+rad` below `rad` on EMT: {'yes' if t['with_rad_below_rad'] else 'no'}")
    return lines


def _name(method: str, scorer: str, labellers: dict[str, set[str]]) -> str:
    return f"{method} {LABELLED}" if scorer in labellers.get(method, ()) else method


def _labelled_note(table: dict, scorer: str, labellers: dict[str, set[str]]) -> list[str]:
    marked = [m for m in table if scorer in labellers.get(m, ())]
    return ["", f"{LABELLED} {', '.join(marked)}: {scorer} labelled the queries of this row's mask, so it is not an "
            "independent judge of this row."] if marked else []


def _fmt(cell: dict, pct: bool = False) -> str:
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(cell['value'])} [{f(cell['ci'][0])}, {f(cell['ci'][1])}]"


def _cell(row: dict, group: str, metric: str, pct: bool = False) -> str:
    return _fmt(row[group][metric], pct) if group in row else "-"


def comparison_markdown(table: dict, lambada: dict, targets: dict, prompts: str, scorer: str,
                        labellers: dict[str, set[str]]) -> str:
    """The paper's table: EMT / TP on all, toxic and non-toxic prompts, held-out perplexity, LAMBADA."""
    lines = [f"# {SET_TITLES.get(prompts, prompts)}: comparison, scorer {scorer}", "",
             "Averaged over training seeds; brackets are 95% bootstrap intervals over prompts. RAD is a decoding "
             "method: perplexity is not defined for it (n/a), and its LAMBADA figure would be its base model's. "
             "LAMBADA: last-word / last-token accuracy.", "",
             "| method | seeds | EMT | TP | EMT toxic | TP toxic | EMT non-toxic | TP non-toxic | share >= 0.5 | "
             "ppl held-out | ppl WikiText-2 | LAMBADA |", "|" + "---|" * 12]
    for m in sorted(table, key=_row_order):
        r = table[m]
        ppl = (f"{r['perplexity']['heldout']:.1f} | {r['perplexity']['wikitext']:.1f}" if r["perplexity"]
               else "n/a | n/a")
        acc = (f"{lambada[m]['last_word']:.1%} / {lambada[m]['last_token']:.1%}" if m in lambada and r["perplexity"]
               else "n/a" if not r["perplexity"] else "-")
        lines.append(f"| {_name(m, scorer, labellers)} | {r['seeds']} | {_cell(r, 'all', 'emt')} | "
                     f"{_cell(r, 'all', 'tp')} | "
                     f"{_cell(r, 'toxic', 'emt')} | {_cell(r, 'toxic', 'tp')} | {_cell(r, 'nontoxic', 'emt')} | "
                     f"{_cell(r, 'nontoxic', 'tp')} | {_cell(r, 'all', 'share', True)} | {ppl} | {acc} |")
    if lambada:
        any_row = next(iter(lambada.values()))
        lines += ["", f"LAMBADA: {any_row['passages']:,} passages of the test set; contexts longer than the model's "
                  "block are cut from the left."]
    lines += _labelled_note(table, scorer, labellers) + _target_lines(targets, scorer)
    return "\n".join(lines) + "\n"


def set_markdown(table: dict, prompts: str, scorer: str, labellers: dict[str, set[str]]) -> str:
    """One prompt set (BOLD, AttaQ, ToxiGen) under one scorer: EMT, TP, mean score and share per method."""
    title = ("Implicit toxicity: ToxiGen prompts, scorer toxigen" if (prompts, scorer) == ("toxigen", "toxigen")
             else f"{SET_TITLES.get(prompts, prompts)}, scorer {scorer}")
    lines = [f"# {title}", "", "| method | seeds | EMT | TP | mean score | share >= 0.5 |", "|---|---|---|---|---|---|"]
    for m in sorted(table, key=_row_order):
        r = table[m]
        lines.append(f"| {_name(m, scorer, labellers)} | {r['seeds']} | {_fmt(r['all']['emt'])} | "
                     f"{_fmt(r['all']['tp'])} | {r['all']['mean']['value']:.3f} | {_fmt(r['all']['share'], True)} |")
    return "\n".join(lines + _labelled_note(table, scorer, labellers)) + "\n"


SWEEP_SUFFIX = re.compile(r"^(?P<family>.+?)(?P<point>(-L[\d.]+)?(-lam[\d.]+)?(-floor[\de.-]+)?)$")


def _plot(table: dict, path: Path, scorer: str) -> None:
    """EMT against held-out perplexity, one colour per method family: `ifguide sweep` points (MASK-L0.04-lam2)
    share their mask's colour and carry their operating point as a label, so the frontier can be read off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colours: dict[str, str] = {}
    for method, r in sorted(table.items(), key=lambda kv: _row_order(kv[0])):
        emt = r["all"]["emt"]
        yerr = [[emt["value"] - emt["ci"][0]], [emt["ci"][1] - emt["value"]]]
        base = "baseline" if method == "rad" else method.removesuffix("+rad")
        ppl = r["perplexity"] or (table.get(base) or {}).get("perplexity")
        if ppl is None:
            continue
        decoding = not r["perplexity"]  # RAD: drawn hollow at its base model's perplexity
        family, point = SWEEP_SUFFIX.match(method).group("family", "point")
        label = None if family in colours else (f"{family} (at {base}'s ppl)" if decoding else family)
        bar = ax.errorbar(ppl["heldout"], emt["value"], yerr=yerr, fmt="o", capsize=3, color=colours.get(family),
                          mfc="none" if decoding else None, label=label)
        colours.setdefault(family, bar.lines[0].get_color())
        if point:
            ax.annotate(point.lstrip("-").replace("-", " "), (ppl["heldout"], emt["value"]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points", color=colours[family])
    ax.set_xlabel("held-out perplexity (lower is better)")
    ax.set_ylabel(f"Expected Maximum Toxicity ({scorer})")
    ax.set_title("Toxicity vs fluency per method (ifguide sweep points labelled by budget and lambda)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never hides a point
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def rad_slowdown(run: Run, prompts: str) -> dict[str, float]:
    """Per RAD row, its generation time over plain sampling's from the same model and prompts, averaged over seeds
    (both measured in the same run; see benchmarks/bench_rad.py for a side-by-side figure)."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for results in _evaluations(run, prompts):
        rad = json.loads(results.read_text())
        plain = run.eval(rad["model"], prompts) / "results.json"
        if rad.get("decoding") == "rad" and plain.is_file():
            ratios[SEED_SUFFIX.sub("", results.parent.parent.name)].append(
                rad["generation_seconds"] / json.loads(plain.read_text())["generation_seconds"])
    return {method: float(np.mean(r)) for method, r in sorted(ratios.items(), key=lambda kv: _row_order(kv[0]))}


def evaluated_sets(run: Run) -> dict[str, list[str]]:
    """Prompt set -> every scorer any of its evaluations carries."""
    found: dict[str, list[str]] = {}
    for results in _evaluations(run):
        scorers = found.setdefault(results.parent.name, [])
        scorers += [s for s in json.loads(results.read_text())["scorers"] if s not in scorers]
    return found


def report(run: Run, timings: dict | None = None) -> str:
    """Write RUN/report/{results.md, results.json, results.html, toxicity_vs_perplexity.png}; return the markdown.

    One table per prompt set and scorer; RTP under the first configured scorer is the plot and the target check.
    """
    cfg = run.load_config()
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
    tables, sections = {}, []
    for prompts in sorted(sets, key=lambda name: (name != main_prompts, name)):
        for scorer in sorted(sets[prompts], key=lambda name: (name != main_scorer, name in labelling)):
            table = method_table(run, prompts, scorer, cfg.eval.bootstrap, cfg.eval.toxic_threshold)
            targets = _targets(table, scorer, labellers) if prompts == main_prompts else {}
            left_out = comparable_evaluations(run, prompts, scorer)[1]
            tables[f"{prompts}/{scorer}"] = {"methods": table, "targets": targets, "left_out": left_out,
                                             "labelled_rows": sorted(m for m in table
                                                                     if scorer in labellers.get(m, ()))}
            body = (comparison_markdown(table, lambada, targets, prompts, scorer, labellers)
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
    _plot(tables[f"{main_prompts}/{main_scorer}"]["methods"], out / "toxicity_vs_perplexity.png", main_scorer)
    text += "\n![toxicity vs perplexity](toxicity_vs_perplexity.png)\n"
    write_text(out / "results.md", text)
    write_json(out / "results.json", {"tables": tables, "lambada": lambada, "rad_slowdown": slowdown,
                                      "main": f"{main_prompts}/{main_scorer}",
                                      "query_labellers": {m: sorted(v) for m, v in labellers.items()},
                                      "timings_s": timings or {}, "selection_views": [str(m) for m in masks]})
    write_text(out / "results.html", _html(text))
    return text


def _html(markdown_text: str) -> str:
    import html

    body, in_table = [], False
    for line in markdown_text.splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|") != in_table:
            body.append("<table>" if not in_table else "</table>")
            in_table = not in_table
        if line.startswith("|"):
            body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- ["):
            name, link = re.match(r"- \[(.*)\]\((.*)\)", line).groups()
            body.append(f"<li><a href='{html.escape(link)}'>{html.escape(name)}</a></li>")
        elif line.startswith("!["):
            body.append("<img src='toxicity_vs_perplexity.png'>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    return ("<!doctype html><meta charset='utf-8'><title>ifguide results</title><style>body{font-family:sans-serif;"
            "max-width:80em;margin:auto}td{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}"
            "</style>" + "\n".join(body))
