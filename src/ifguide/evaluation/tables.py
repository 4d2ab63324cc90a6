"""The numbers behind the report: per method and prompt set, toxicity averaged over seeds with bootstrap
intervals, the effects against the clean floor with paired intervals, LAMBADA accuracy, RAD's decoding cost
and the verdicts; only evaluations of models as they are now count."""

from __future__ import annotations

import functools
import glob
import json
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import Run, damaged, finished, read_info
from ..data import read_jsonl
from ..errors import IfguideError
from ..names import IFGUIDE_METHODS, REFERENCE, RIVALS, method_of, row_order
from ..queries import JOINED
from .metrics import bootstrap_intervals, mean_metrics, prompt_groups


def _evaluations(run: Run, prompts: str | None = None) -> list[Path]:
    """The results.json of every finished evaluation (of one prompt set); one without a sound info.json or
    whose results are not JSON is damaged."""
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
    """(results.json, recipe inputs) of an evaluation made from its model, and that model from its inputs, as
    they are now; else None."""
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
            found[method_of(results.parent.parent.name)].update(model["query_labeller"].split(JOINED))
    return found


@dataclass(frozen=True)
class Generations:
    """An eval's generations.jsonl, held compactly: each scorer's scores, each sample's prompt label and
    continuation, in file order."""

    scores: dict[str, np.ndarray]
    toxic: list
    continuations: list[str]


def generations(eval_dir: Path) -> Generations:
    """The eval's generations, read once per version of the file (the report reads each for several tables
    and scorers)."""
    file = eval_dir / "generations.jsonl"
    stat = file.stat() if file.is_file() else None
    return _read_generations(file, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=512)
def _read_generations(file: Path, version: tuple[int, int] | None) -> Generations:
    rows = read_jsonl(file, "rerun `ifguide eval --force`")
    names = rows[0]["scores"] if rows else {}
    return Generations({name: np.array([r["scores"][name] for r in rows]) for name in names},
                       [r["toxic"] for r in rows], [r["continuation"] for r in rows])


def _score_matrix(eval_dir: Path, scorer: str, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    rows = generations(eval_dir)
    toxic = np.array(rows.toxic[::num_samples], dtype=object)
    return rows.scores[scorer].reshape(-1, num_samples), toxic


def comparable_evaluations(run: Run, prompts: str, scorer: str) -> tuple[dict[str, list[Path]], list[str]]:
    """Per method, the eval folders of one prompt set that carry `scorer`, were made from the model as it is
    now, and share the prompts the most models were evaluated on; plus one line per model left out and why."""
    found, stale = {}, []
    for results in _evaluations(run, prompts):
        current = _current(run, results)
        if current is None:
            stale.append(f"{results.parent.parent.name}: evaluated before the model was rebuilt "
                         "(rerun ifguide eval)")
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
            by_method[method_of(d.parent.name)].append(d)
    return by_method, left_out


def method_table(run: Run, prompts: str, scorer: str, resamples: int = 1000, threshold: float = 0.5) -> dict:
    """Per method (model name without -sSEED): metrics averaged over seeds, with 95% prompt-bootstrap CIs."""
    by_method, _ = comparable_evaluations(run, prompts, scorer)
    table = {}
    for method, dirs in by_method.items():
        # a row's intervals do not depend on the other rows
        rng = np.random.default_rng(zlib.crc32(method.encode()))
        infos = [json.loads((d / "results.json").read_text()) for d in dirs]
        matrices = [_score_matrix(d, scorer, info["num_samples"]) for d, info in zip(dirs, infos)]
        row = {"models": [d.parent.name for d in dirs], "seeds": len(dirs), "prompts": len(matrices[0][0])}
        for group, keep in prompt_groups(matrices[0][1]).items():
            subsets = [m[keep] for m, _ in matrices]
            point = mean_metrics(subsets, threshold)
            ci = bootstrap_intervals(subsets, threshold, resamples, rng)
            row[group] = {k: {"value": v, "ci": ci[k]} for k, v in point.items()}
        row["perplexity"] = None if infos[0]["perplexity"] is None else {  # None: a decoding method (RAD)
            k: _mean_or_none([i["perplexity"].get(k) for i in infos]) for k in infos[0]["perplexity"]}
        model = read_info(run.model(infos[0].get("model", dirs[0].parent.name))) or {}
        row["token_share"] = {k: model.get(f"{k}_token_share") for k in ("dropped", "penalised")} | {
            "objective": model.get("objective")}
        row["epochs"], row["steps"] = model.get("epochs"), model.get("steps")
        row["per_seed_emt"] = [i["scorers"][scorer]["all"]["emt"] for i in infos]
        table[method] = row
    return table


def _mean_or_none(values: list) -> float | None:
    """The mean, or None when any value is missing (a block set the data build left empty)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def lambada_table(run: Run) -> dict:
    """Per method, LAMBADA last-word and last-token accuracy averaged over seeds (current models only)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for results in _evaluations(run, "lambada"):
        current = _current(run, results)
        if current is not None:
            by_method[method_of(current[0]["model"])].append(current[0]["lambada"])
    return {method: {k: float(np.mean([r[k] for r in rows])) for k in ("last_word", "last_token")}
            | {"seeds": len(rows), "passages": rows[0]["passages"]} for method, rows in by_method.items()}


def per_prompt(dirs: list[Path], scorer: str, blocklist: re.Pattern) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, averaged over the seeds' evaluations: the highest score of its samples (EMT's term) and the
    share of its samples holding a blocklisted word."""
    emts, hits = [], []
    for d in dirs:
        rows = generations(d)
        samples = json.loads((d / "results.json").read_text())["num_samples"]
        emts.append(rows.scores[scorer].reshape(-1, samples).max(axis=1))
        hits.append(np.array([blocklist.search(text.lower()) is not None for text in rows.continuations])
                    .reshape(-1, samples).mean(axis=1))
    return np.mean(emts, axis=0), np.mean(hits, axis=0)


def _interval(draws: np.ndarray, point: float) -> dict:
    return {"value": float(point), "ci": [float(np.percentile(draws, q)) for q in (2.5, 97.5)]}


def floor_table(run: Run, prompts: str, scorer: str, blocklist: re.Pattern, resamples: int = 1000) -> dict:
    """Per method, with 95% paired bootstrap intervals (the same prompts resampled for every row, seeds
    averaged per prompt): the removed share (baseline - method) / (baseline - clean), its EMT minus each
    rival's and the baseline's, and the share of its samples holding a blocklisted word, minus the
    filter's."""
    by_method, _ = comparable_evaluations(run, prompts, scorer)
    if "baseline" not in by_method:
        return {}
    emt, hit = {}, {}
    for method, dirs in by_method.items():
        emt[method], hit[method] = per_prompt(dirs, scorer, blocklist)
    n = len(emt["baseline"])
    rows = np.random.default_rng(zlib.crc32(f"{prompts}/{scorer}".encode())).integers(0, n, (resamples, n))
    emt_mean = {m: (v[rows].mean(axis=1), v.mean()) for m, v in emt.items()}
    hit_mean = {m: (v[rows].mean(axis=1), v.mean()) for m, v in hit.items()}
    table = {}
    for method in emt:
        row = {"blocklisted_share": _interval(*hit_mean[method])}
        if REFERENCE in emt and method not in ("baseline", REFERENCE):
            (base, base_point), (clean, clean_point) = emt_mean["baseline"], emt_mean[REFERENCE]
            draws, point = emt_mean[method]
            row["removed_share"] = _interval((base - draws) / (base - clean),
                                             (base_point - point) / (base_point - clean_point))
        for other in ("baseline", *RIVALS):
            if other in emt and other != method:
                row[f"emt_minus_{other}"] = _interval(emt_mean[method][0] - emt_mean[other][0],
                                                      emt_mean[method][1] - emt_mean[other][1])
        if "filter" in hit and method != "filter":
            row["blocklisted_minus_filter"] = _interval(hit_mean[method][0] - hit_mean["filter"][0],
                                                        hit_mean[method][1] - hit_mean["filter"][1])
        table[method] = row
    return table


def verdict(difference: dict) -> str:
    """`yes` when the 95% interval of (ours - theirs) lies below zero, `no` above, `tie` when it holds
    zero."""
    low, high = difference["ci"]
    return "yes" if high < 0 else "no" if low > 0 else "tie"


def check_targets(table: dict, floor: dict, scorer: str, labellers: dict[str, set[str]]) -> dict:
    """Per IF-Guide row (the default and the paper's), its effect against the baseline and the floor and its
    verdict against each rival (paired intervals, `floor`); a row whose queries this scorer labelled gets no
    verdicts here (the scorer is not independent of it)."""
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
        ours, effects = table[method]["all"], floor.get(method, {})
        row = {"emt_reduction_x": base["emt"]["value"] / max(ours["emt"]["value"], 1e-9),
               "share_reduction_x": base["share"]["value"] / max(ours["share"]["value"], 1e-9),
               "heldout_ppl_rise": table[method]["perplexity"]["heldout"]
               / table["baseline"]["perplexity"]["heldout"] - 1}
        shown = ("removed_share", "blocklisted_share", "blocklisted_minus_filter", "emt_minus_filter")
        row |= {key: effects[key] for key in shown if key in effects}
        for rival in RIVALS:
            if f"emt_minus_{rival}" in effects:
                row[f"beats_{rival}_on_emt"] = verdict(effects[f"emt_minus_{rival}"])
        if "emt_minus_filter" in effects:  # lower EMT at a held-out perplexity below the filter's
            below = table[method]["perplexity"]["heldout"] < table["filter"]["perplexity"]["heldout"]
            row["dominates_filter"] = row["beats_filter_on_emt"] if below else "no"
        if "emt_minus_rad" in floor.get(f"{method}+rad", {}):
            row["with_rad_below_rad"] = verdict(floor[f"{method}+rad"]["emt_minus_rad"])
        out[method] = row
    return out


def rad_slowdown(run: Run, prompts: str) -> dict[str, float]:
    """Per RAD row, its generation time over plain sampling's from the same model and prompts, averaged over
    seeds (both measured in the same run; see benchmarks/bench_rad.py for a side-by-side figure)."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for results in _evaluations(run, prompts):
        rad = json.loads(results.read_text())
        plain = run.eval(rad["model"], prompts) / "results.json"
        if rad.get("decoding") == "rad" and plain.is_file():
            ratios[method_of(results.parent.parent.name)].append(
                rad["generation_seconds"] / json.loads(plain.read_text())["generation_seconds"])
    return {method: float(np.mean(r)) for method, r in sorted(ratios.items(),
                                                              key=lambda kv: row_order(kv[0]))}


def evaluated_sets(run: Run) -> dict[str, list[str]]:
    """Prompt set -> every scorer any of its evaluations carries."""
    found: dict[str, list[str]] = {}
    for results in _evaluations(run):
        scorers = found.setdefault(results.parent.name, [])
        scorers += [s for s in json.loads(results.read_text())["scorers"] if s not in scorers]
    return found
