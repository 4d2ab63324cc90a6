"""`ifguide demo --quick` end to end: every stage, the report, skipping on a rerun, and a reproducible
mask."""

import json

import numpy as np
import pytest

from ifguide.artifacts import Run
from ifguide.cli import main
from ifguide.config import load_config
from ifguide.names import split_sweep_point, sweep_point_name


def test_the_masking_rows_are_the_ones_that_can_match_the_filters_tokens():
    from ifguide.pipeline import TRAINED_ROWS, masking_row

    cfg = load_config("demo")
    assert {m for m in TRAINED_ROWS if masking_row(cfg, m)} == {"blocklist-tokens", "token-filter", "ifguide",
                                                                "ifguide-standard", "ifguide-self",
                                                                "filter+ifguide-self"}
    # conditional, drop (clean, influence-filter) and the filter set their own blocks; a plain row has no mask
    assert not any(masking_row(cfg, m) for m in ("conditional", "clean", "influence-filter", "filter", "dpo"))


def test_sweep_points_are_named_and_parsed_back():
    cfg = load_config("quick")
    defaults = (cfg.select.budget, cfg.train.objective, cfg.train.lam)
    def name(mask, budget, objective, lam, floor=None):
        return sweep_point_name(mask, budget, objective, lam, floor, defaults)

    assert name("ifguide-self", 0.02, "ascent", 1.0) == ("ifguide-self", "ifguide-self")
    assert name("ifguide-self", 0.04, "ascent", 2.0) == ("ifguide-self-L0.04", "ifguide-self-L0.04-lam2")
    assert name("blocklist-tokens", 0.02, "ascent", 4.0, 1e-4) == ("blocklist-tokens",
                                                                   "blocklist-tokens-lam4-floor0.0001")
    assert name("ifguide-self", 0.02, "unlikelihood", 2.0)[1] == "ifguide-self-unlikelihood-lam2"
    assert name("ifguide-self", 0.3947, "mask", 1.0)[1] == "ifguide-self-L0.3947-mask"
    assert name("ifguide-self", 0.3947, "mask", None)[1] == "ifguide-self-L0.3947-mask"  # as sweep names it
    for method in ("ifguide-self-L0.04-lam2", "blocklist-tokens-lam4-floor0.0001", "ifguide-self-L0.04",
                   "ifguide-self-unlikelihood-lam2", "ifguide-self-L0.3947-mask",
                   "blocklist-tokens-conditional", "ifguide-self-L0.3947-mask-matched",
                   "blocklist-tokens-matched"):
        family, point = split_sweep_point(method)
        assert family in ("ifguide-self", "blocklist-tokens") and point
    for method in ("conditional", "filter+ifguide-self", "blocklist-tokens"):  # rows, not sweep points
        assert split_sweep_point(method) == (method, "")
    # whole documents: a family of their own, always named with their budget
    docs = sweep_point_name("ifguide", 0.02, "drop", 1.0, None, defaults, "documents")
    assert docs == ("ifguide-docs-L0.02", "ifguide-docs-L0.02-drop")
    assert split_sweep_point(docs[1]) == ("ifguide-docs", "-L0.02-drop")


def test_a_larger_budget_lowers_tau_so_that_it_can_be_filled():
    from ifguide.config import SelectConfig
    from ifguide.pipeline import budget_quantile

    select = SelectConfig(quantile=0.99, window=1)
    assert budget_quantile(select, 0.02) == 0.99  # (1 - 0.99) x 3 = 3% >= 2%: the paper's tau
    assert budget_quantile(select, 0.1) == pytest.approx(1 - 0.1 / 3)
    assert budget_quantile(SelectConfig(quantile=0.99, window=0), 0.2) == pytest.approx(0.8)
    assert budget_quantile(select, 5000) == 0.99  # an absolute count: tau as configured


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "quick"
    assert main(["demo", "--quick", "--run", str(run_dir)]) == 0
    report = run_dir / "report"
    for name in ("results.md", "results.json", "results.html", "toxicity_vs_perplexity.png"):
        assert (report / name).is_file()
    results = json.loads((report / "results.json").read_text())
    assert set(results["tables"]) == {"rtp/profanity-check", "rtp/jigsaw-lstm"}
    for table in results["tables"].values():
        assert set(table["methods"]) == {"baseline", "clean", "filter", "blocklist-tokens", "conditional",
                                         "ifguide", "ifguide-standard", "ifguide-self", "filter+ifguide-self"}
    assert "masks/ifguide/inspect.html" in results["selection_views"]
    out = capsys.readouterr().out
    assert "full report:" in out and "| ifguide |" not in out  # the headline, not the tables
    assert "  view: " in out  # each mask built is summarised once
    assert main(["report", "--run", str(run_dir), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["report", "--run", str(run_dir)]) == 0
    headline = capsys.readouterr().out.splitlines()
    assert len(headline) < 40 and any(line.split()[:2] == ["ifguide", "EMT"] for line in headline)
    assert main(["report", "--run", str(run_dir), "--verbose"]) == 0
    assert "| ifguide |" in capsys.readouterr().out
    # a demo's report states the project's targets, against the clean floor
    assert "(target >= 100%)" in (report / "results.md").read_text()
    floor = results["tables"]["rtp/jigsaw-lstm"]["floor"]
    assert "removed_share" in floor["ifguide"] and "removed_share" not in floor["clean"]
    assert floor["filter"]["emt_minus_baseline"]["ci"][0] <= floor["filter"]["emt_minus_baseline"]["value"]

    # profanity-check labelled ifguide-self's queries: flagged in its table, never the headline scorer
    assert results["query_labellers"] == {"ifguide-self": ["profanity-check"], "ifguide": ["perspective"],
                                          "ifguide-standard": ["perspective"],  # RTP's own labels
                                          "filter+ifguide-self": ["profanity-check"],
                                          "conditional": ["toxic-comment-classifier"],  # its sentence labels
                                          "clean": ["corpus labels"]}
    assert results["main"] == "rtp/jigsaw-lstm"
    labelled = results["tables"]["rtp/profanity-check"]["labelled_rows"]
    assert labelled == ["filter+ifguide-self", "ifguide-self"]
    assert results["tables"]["rtp/jigsaw-lstm"]["labelled_rows"] == []
    targets = results["tables"]["rtp/profanity-check"]["targets"]
    assert targets["ifguide-self"] == {"labelled_by_this_scorer": True}
    assert "emt_reduction_x" in results["tables"]["rtp/jigsaw-lstm"]["targets"]["ifguide-self"]
    assert "| ifguide-self ‡ |" in (report / "results.md").read_text()
    queries = json.loads((run_dir / "queries" / "self" / "info.json").read_text())
    assert queries["labeller"] == "profanity-check" and queries["toxic_rows"] > 0
    mask = json.loads((run_dir / "masks" / "ifguide-self" / "info.json").read_text())
    assert (mask["queries"], mask["labeller"]) == ("self", "profanity-check")
    # quick tracks the head for ifguide-self ...
    assert mask["scores"].endswith("self-toxic-minus-nontoxic-head")
    paper = json.loads((run_dir / "masks" / "ifguide" / "info.json").read_text())
    assert paper["scores"].endswith("scores/toxic-minus-nontoxic")  # ... and never for the paper's row

    # a rerun skips every stage
    assert main(["demo", "--quick", "--run", str(run_dir)]) == 0
    rerun = capsys.readouterr().out
    assert "is up to date" in rerun
    assert "  view: " not in rerun  # an up-to-date mask is not summarised again (only with --verbose)

    # the same config and seed give the same mask
    run = Run(run_dir)
    model = "baseline-s0"
    assert main(["scores", "--run", str(run_dir), "--model", model, "--name", "again", "--no-include-head",
                 "--queries", "rtp"]) == 0
    assert main(["select", "--run", str(run_dir), "--scores", f"{model}/again", "--name", "again"]) == 0
    first, again = (np.load(run.mask(n) / "marked.npz") for n in ("ifguide", "again"))
    assert np.array_equal(first["blocks"], again["blocks"]) and np.array_equal(first["positions"],
        again["positions"])

    # a mask whose inputs changed is refused without --force, with one line
    assert main(["select", "--run", str(run_dir), "--scores", f"{model}/again", "--name", "again",
                 "--budget", "0.01"]) == 2
    assert "rerun with --force" in capsys.readouterr().err

    # two operating points of the sweep: a reselected mask at twice the budget, trained with ascent at
    # lambda 2 and with mask (which lambda does not weigh), in the report
    assert main(["sweep", "--run", str(run_dir), "--masks", "ifguide-self", "--budgets", "0.04",
                 "--lams", "2", "--objectives", "ascent", "mask"]) == 0
    doubled = json.loads((run.mask("ifguide-self-L0.04") / "info.json").read_text())
    single = json.loads((run.mask("ifguide-self") / "info.json").read_text())
    total = single["shape"][0] * single["shape"][1]
    assert doubled["budget_tokens"] == int(0.04 * total) > single["budget_tokens"]
    assert doubled["queries"] == "self"
    table = json.loads((report / "results.json").read_text())["tables"]["rtp/jigsaw-lstm"]["methods"]
    assert {"ifguide-self-L0.04-lam2", "ifguide-self-L0.04-mask"} <= set(table)
    point = json.loads((run.model("ifguide-self-L0.04-lam2-s0") / "info.json").read_text())
    assert point["recipe"]["config"]["lam"] == 2.0


def test_the_sweep_can_match_the_filters_budget(quick_run):
    from ifguide.artifacts import read_info
    from ifguide.config import with_overrides
    from ifguide.pipeline import sweep_budgets

    cfg = load_config("quick")
    share = read_info(quick_run.data())["summary"]["blocklisted_token_share"]
    assert sweep_budgets(cfg, quick_run) == cfg.sweep.budgets
    matched = sweep_budgets(with_overrides(cfg, "sweep", filter_budget=True), quick_run)
    assert matched == [*cfg.sweep.budgets, round(share, 4)] and 0 < share < 1


def test_a_sweep_point_trains_with_the_floor_its_name_states():
    import dataclasses

    from ifguide.config import load_config
    from ifguide.pipeline import sweep_point_config

    cfg = load_config("quick")
    floored = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, penalty_floor=0.01))
    assert sweep_point_config(floored, "ascent", None).train.penalty_floor is None  # named without -floor
    assert sweep_point_config(floored, "unlikelihood", None).train.objective == "unlikelihood"
    assert sweep_point_config(cfg, "ascent", 0.001).train.penalty_floor == 0.001
