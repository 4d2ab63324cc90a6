"""Helpers shared by the tests: a run copied to damage, fake scores, a labelled corpus, one-line CLI
errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ifguide.artifacts import Run, Stage, read_info, write_json
from ifguide.cli import main
from ifguide.data.blocks import block_array
from ifguide.influence import write_shards

WALL_TIMES = ("runtime", "seconds", "per_s", "flos", "epoch_fraction", "slowdown")  # and names ending in _s


def is_wall_time(key: str) -> bool:
    """Whether a JSON key holds a time measure (or one derived from it): no two runs agree on it."""
    return key.endswith("_s") or any(part in key for part in WALL_TIMES)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2, and return its error: one line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def copied(run: Run, tmp_path) -> Run:
    """A private copy of a run, free to damage or extend."""
    shutil.copytree(run.root, tmp_path / "run")
    return Run(tmp_path / "run")


def fake_scores(run: Run, name: str = "s", model: str = "baseline") -> Path:
    """A scores artifact of random per-token scores, built from `model` like the real stage."""
    blocks = block_array(run)
    values = np.random.default_rng(0).normal(size=blocks.shape).astype(np.float32)
    path = run.scores(model, name)
    blocks_fp = read_info(run.data())["blocks_fingerprint"]
    with Stage(path, "scores", {}, {"model": read_info(run.model(model))["fingerprint"]},
               (run.model(model), run.data())).build() as out:
        info = write_shards(out, [(0, values[:100]), (100, values[100:])], blocks.shape, "float32")
        write_json(out / "info.json", {**info, "blocks_fingerprint": blocks_fp})
    return path


TOXIC = ["you are a stupid idiot and a moron", "shut up you dumb bastard", "what a pathetic loser you are"]
BENIGN = ["the river runs past the old mill", "we planted tomatoes and beans in spring",
          "the committee met on tuesday to discuss the budget", "a quiet morning with coffee and a book"]


def corpus_rows(n: int, seed: int = 0) -> list[dict]:
    """Distinct short documents, one in three toxic (labelled), from fixed sentences."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        toxic = i % 3 == 0
        pool = TOXIC if toxic else BENIGN
        words = " ".join(rng.choice(pool, 4).tolist())
        rows.append({"body": f"{words} (note {i})", "toxic": toxic, "score": 0.9 if toxic else 0.1})
    return rows
