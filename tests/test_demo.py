"""`ifguide demo --quick` end to end: every stage, the report, skipping on a rerun, and a reproducible mask."""

import json

import numpy as np

from ifguide.artifacts import Run
from ifguide.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "quick"
    assert main(["demo", "--quick", "--run", str(run_dir)]) == 0
    report = run_dir / "report"
    for name in ("results.md", "results.json", "results.html", "toxicity_vs_perplexity.png"):
        assert (report / name).is_file()
    results = json.loads((report / "results.json").read_text())
    assert set(results["tables"]) == {"rtp/profanity-check", "rtp/jigsaw-lstm"}
    for table in results["tables"].values():
        assert set(table["methods"]) == {"baseline", "filter", "blocklist-tokens", "ifguide", "ifguide-standard"}
    assert "masks/ifguide/inspect.html" in results["selection_views"]
    assert "| ifguide |" in capsys.readouterr().out

    # a rerun skips every stage
    assert main(["demo", "--quick", "--run", str(run_dir)]) == 0
    assert "is up to date" in capsys.readouterr().out

    # the same config and seed give the same mask
    run = Run(run_dir)
    model = "baseline-s0"
    assert main(["scores", "--run", str(run_dir), "--model", model, "--name", "again"]) == 0
    assert main(["select", "--run", str(run_dir), "--scores", f"{model}/again", "--name", "again"]) == 0
    first, again = (np.load(run.mask(n) / "marked.npz") for n in ("ifguide", "again"))
    assert np.array_equal(first["blocks"], again["blocks"]) and np.array_equal(first["positions"], again["positions"])

    # a mask whose inputs changed is refused without --force, with one line
    assert main(["select", "--run", str(run_dir), "--scores", f"{model}/again", "--name", "again",
                 "--budget", "0.01"]) == 2
    assert "rerun with --force" in capsys.readouterr().err
