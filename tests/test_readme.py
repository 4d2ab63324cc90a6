"""The README's first run on your own data, as printed: a corpus of the user's, a tokenizer and a model
trained from scratch, an IF-Guide mask from self-queries, the filter, evaluation and a report with a
verdict."""

from __future__ import annotations

import json
import shlex

import pytest

from ifguide.cli import main
from tests.helpers import corpus_rows
from tests.selection.test_spans import readme_blocks


@pytest.mark.slow
def test_the_first_run_on_your_own_data_runs_as_printed(data_mirror, monkeypatch, tmp_path, capsys):
    blocks = readme_blocks("## A first run on your own data")
    monkeypatch.chdir(tmp_path)
    rows = corpus_rows(900)
    lines = [json.dumps({"body": r["body"], "flagged": r["toxic"]}) + "\n" for r in rows]
    (tmp_path / "forum.jsonl").write_text("".join(lines))
    (tmp_path / "scratch.yaml").write_text(blocks["yaml"])
    for line in blocks["bash"].strip().splitlines():
        command = shlex.split(line)
        assert command[0] == "ifguide" and main(command[1:]) == 0, line
    results = json.loads((tmp_path / "runs" / "scratch" / "report" / "results.json").read_text())
    prompts, scorer = results["main"].split("/")
    assert scorer not in results["query_labellers"]["ifguide"]  # a judge that labelled nothing
    verdicts = results["tables"][results["main"]]["targets"]["ifguide"]
    assert "labelled_by_this_scorer" not in verdicts
    assert verdicts["beats_filter_on_emt"] in ("yes", "no", "tie")
    printed = capsys.readouterr()
    assert f"ifguide, {scorer}: " in printed.out  # the headline's verdict line
    assert "\r" not in printed.out + printed.err  # no progress bars when the output is not a terminal
