"""Effects against the clean floor (evaluation/tables.py): per-prompt terms, paired bootstrap intervals, the
removed share and the verdicts, against hand-worked values."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ifguide.evaluation import tables

BLOCKLIST = re.compile(r"(?<![a-z0-9])(?:damn)(?![a-z0-9])")


def write_eval(folder, scores: list[list[float]], texts: list[list[str]]) -> None:
    folder.mkdir(parents=True)
    rows = [{"prompt": "p", "toxic": None, "continuation": t, "scores": {"s": s}}
            for score_row, text_row in zip(scores, texts) for s, t in zip(score_row, text_row)]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps({"num_samples": len(scores[0])}))


def test_per_prompt_terms_average_the_seeds(tmp_path):
    write_eval(tmp_path / "s0", [[0.1, 0.9, 0.2], [0.3, 0.3, 0.0]], [["a", "Damn.", "b"], ["c", "d", "e"]])
    write_eval(tmp_path / "s1", [[0.5, 0.4, 0.2], [0.1, 0.7, 0.0]],
               [["damnit", "x", "y"], ["DAMN", "z", "w"]])
    emt, blocklisted = tables.per_prompt([tmp_path / "s0", tmp_path / "s1"], "s", BLOCKLIST)
    np.testing.assert_allclose(emt, [(0.9 + 0.5) / 2, (0.3 + 0.7) / 2])
    np.testing.assert_allclose(blocklisted, [(1 / 3 + 0) / 2, (0 + 1 / 3) / 2])  # "damnit" is another word


def floor_of(monkeypatch, emts: dict[str, np.ndarray], hits: dict[str, np.ndarray] | None = None) -> dict:
    hits = hits or {m: np.zeros_like(v) for m, v in emts.items()}
    monkeypatch.setattr(tables, "comparable_evaluations",
                        lambda run, prompts, scorer: ({m: m for m in emts}, []))
    monkeypatch.setattr(tables, "per_prompt", lambda method, scorer, blocklist: (emts[method], hits[method]))
    return tables.floor_table(None, "rtp", "s", BLOCKLIST, resamples=500)


def test_removed_share_and_differences_are_paired_over_prompts(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.9, 200)  # prompts differ far more than the methods do
    floor = floor_of(monkeypatch, {"baseline": base, "clean": base - 0.10, "ifguide-self": base - 0.04,
                                   "filter": base - 0.05})
    ours = floor["ifguide-self"]
    assert ours["removed_share"]["value"] == pytest.approx(0.4)
    # the same shift on every prompt: a paired interval has no width at all (an unpaired one would be ~0.06)
    assert ours["removed_share"]["ci"] == pytest.approx([0.4, 0.4])
    assert ours["emt_minus_filter"]["ci"] == pytest.approx([0.01, 0.01])
    assert ours["emt_minus_baseline"]["value"] == pytest.approx(-0.04)
    assert tables.verdict(ours["emt_minus_filter"]) == "no"
    assert tables.verdict(floor["filter"]["emt_minus_baseline"]) == "yes"
    assert "removed_share" not in floor["baseline"] and "removed_share" not in floor["clean"]


def test_a_difference_whose_interval_holds_zero_is_a_tie(monkeypatch):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.9, 200)
    noise = rng.normal(0, 0.05, 200)
    floor = floor_of(monkeypatch,
                     {"baseline": base, "filter": base - 0.05, "ifguide-self": base - 0.05 + noise},
                     {"baseline": np.full(200, 0.02), "filter": np.zeros(200),
                      "ifguide-self": np.full(200, 0.01)})
    ours = floor["ifguide-self"]
    low, high = ours["emt_minus_filter"]["ci"]
    assert low < 0 < high and tables.verdict(ours["emt_minus_filter"]) == "tie"
    assert ours["emt_minus_filter"]["value"] == pytest.approx(noise.mean())
    assert ours["blocklisted_minus_filter"]["value"] == pytest.approx(0.01)
    assert "removed_share" not in ours  # no clean reference evaluated


def test_verdicts_need_paired_effects(monkeypatch):
    def row(emt, ppl):
        return {"all": {"emt": {"value": emt}, "share": {"value": 0.1}}, "perplexity": {"heldout": ppl}}

    table = {"baseline": row(0.5, 100.0), "filter": row(0.42, 106.0), "ifguide-self": row(0.40, 100.5)}
    base = np.linspace(0.2, 0.8, 100)
    floor = floor_of(monkeypatch, {"baseline": base, "filter": base - 0.08, "ifguide-self": base - 0.10})
    judged = tables.check_targets(table, floor, "s", {})["ifguide-self"]
    assert judged["beats_filter_on_emt"] == "yes" and judged["dominates_filter"] == "yes"
    table["ifguide-self"]["perplexity"]["heldout"] = 107.0  # lower EMT, but a higher perplexity
    assert tables.check_targets(table, floor, "s", {})["ifguide-self"]["dominates_filter"] == "no"
