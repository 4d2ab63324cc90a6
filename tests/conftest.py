"""Shared fixtures: the data mirror, a prepared+trained `quick` run, and a micro model for influence tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ifguide.artifacts import Run
from ifguide.config import ModelConfig, load_config
from ifguide.console import show_messages
from ifguide.model import build_model

os.environ.setdefault("CI", "true")  # no progress bars in test logs
MIRROR = Path(os.environ.get("IFGUIDE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def messages_shown() -> None:
    """Stage functions called directly print their messages, as under the CLI (tests read them)."""
    show_messages()


@pytest.fixture(scope="session", autouse=True)
def mirror_location() -> None:
    """Point IFGUIDE_DATA at the mirror when it is there; tests that need none run without it."""
    if (MIRROR / "MANIFEST.json").is_file():
        os.environ["IFGUIDE_DATA"] = str(MIRROR)


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """The public data mirror, required by the fixtures and tests that read it."""
    if not (MIRROR / "MANIFEST.json").is_file():
        pytest.exit(f"the public data mirror is missing at {MIRROR}; set IFGUIDE_DATA", returncode=2)
    return MIRROR


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, data_mirror) -> Run:
    """A `quick` run with prepared data and a trained baseline (shared by the tests that need one)."""
    from ifguide.data.stage import prepare
    from ifguide.training.stage import train

    run = Run(tmp_path_factory.mktemp("quick") / "run")
    cfg = load_config("quick")
    run.save_config(cfg)
    prepare(cfg, run)
    train(cfg, run, "baseline", seed=0)
    return run


def micro_model(vocab: int = 64, block: int = 16, seed: int = 0, layers: int = 2, width: int = 32):
    """A tiny GPT-NeoX for exact checks."""
    cfg = ModelConfig(arch="gpt_neox", n_layer=layers, n_head=2, d_model=width, d_ff=2 * width)
    return build_model(cfg, vocab, block, eos_id=0, seed=seed)


def micro_queries(rng: np.random.Generator, n_toxic: int, n_nontoxic: int, vocab: int, length: int = 12,
                  toxic_span: list[int] | None = None) -> dict:
    """Query rows (prompt then continuation, right padding) as a dict of lists, like RUN/data/queries."""
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "toxic": []}
    for i in range(n_toxic + n_nontoxic):
        toxic = i < n_toxic
        prompt = rng.integers(1, vocab // 2, 4).tolist()
        cont = list(toxic_span) if toxic and toxic_span else rng.integers(1, vocab // 2, 4).tolist()
        used = len(prompt) + len(cont) - int(rng.integers(0, 2))
        ids = (prompt + cont)[:used]
        pad = length - len(ids)
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append([-100] * len(prompt) + ids[len(prompt):] + [-100] * pad)
        rows["toxic"].append(toxic)
    return rows


class ListQueries:
    """Row access by index, like a datasets.Dataset of queries."""

    def __init__(self, rows: dict):
        self.rows = rows
        self.column_names = list(rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.rows[key]
        return {k: v[key] for k, v in self.rows.items()}


@pytest.fixture
def torch_seed():
    torch.manual_seed(0)
