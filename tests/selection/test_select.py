"""Algorithm 1 (selection/algorithm1.py): hand-worked cases, a property test against an in-memory reference,
the mask loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ifguide.errors import IfguideError
from ifguide.influence import ScoreReader, write_shards
from ifguide.selection.algorithm1 import algorithm1, exact_quantile, mark_windows, rank_blocks
from ifguide.selection.masks import load_mask


def write_scores(path: Path, scores: np.ndarray, shard_blocks: int) -> ScoreReader:
    """Synthetic score shards in the layout `ifguide scores` writes."""
    path.mkdir(parents=True, exist_ok=True)
    shards = ((start, scores[start: start + shard_blocks]) for start in range(0, len(scores), shard_blocks))
    write_shards(path, shards, scores.shape, "float32")
    return ScoreReader(path)


def reference_algorithm1(S: np.ndarray, q: float, w: int, L: int) -> set[tuple[int, int]]:
    """Plain, token-by-token Algorithm 1 over an in-memory matrix."""
    tau = np.quantile(S.astype(np.float64), q)
    above = S > tau
    s = above.sum(1).astype(float)
    f = np.where(above, S, 0).sum(1).astype(float)

    def norm(x):
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)

    sn, fn = norm(s), norm(f)
    h = [2 * a * b / (a + b) if a + b > 0 else 0.0 for a, b in zip(sn, fn)]
    order = sorted(range(len(S)), key=lambda i: (-h[i], i))
    marked: set[tuple[int, int]] = set()
    for i in order:
        for j in range(S.shape[1]):
            if not above[i, j]:
                continue
            window = [(i, k) for k in range(max(j - w, 0), min(j + w, S.shape[1] - 1) + 1)
                      if (i, k) not in marked]
            if len(marked) + len(window) > L:
                return marked
            marked.update(window)
    return marked


def as_set(result: dict) -> set[tuple[int, int]]:
    return set(zip(result["blocks"].tolist(), result["positions"].tolist()))


def test_windows_clip_at_block_edges_and_overlaps_count_once():
    # block 0: hits at 0 and 1 (window clipped at the left edge, overlapping); block 1: hit at the last
    # position
    order = np.array([0, 1])
    blocks, positions = mark_windows(order, np.array([0, 0, 1]), np.array([0, 1, 5]), block_size=6, window=1,
                                     budget=100)
    assert sorted(zip(blocks.tolist(), positions.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 4), (1, 5)]


def test_budget_stops_before_it_would_be_passed():
    # windows add 2 (clipped), then 1 new (overlap), then 3: a budget of 4 keeps the first two windows only
    order = np.array([0])
    blocks, positions = mark_windows(order, np.array([0, 0, 0]), np.array([0, 1, 5]), block_size=10, window=1,
                                     budget=4)
    assert positions.tolist() == [0, 1, 2]
    _, positions = mark_windows(order, np.array([0, 0, 0]), np.array([0, 1, 5]), block_size=10, window=1,
                                budget=6)
    assert positions.tolist() == [0, 1, 2, 4, 5, 6]


def test_block_ranking_by_harmonic_mean_with_ties_by_index():
    s = np.array([2, 0, 2, 1])
    f = np.array([10.0, 0.0, 10.0, 9.0])
    # normalised: s = [1, 0, 1, .5], f = [1, 0, 1, .9] -> h = [1, 0, 1, .643]; tie 0/2 broken by index
    assert rank_blocks(s, f).tolist() == [0, 2, 3, 1]


def test_hand_worked_matrix(tmp_path):
    S = np.array([[0, 9, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0],  # no score above tau
                  [8, 0, 0, 0, 0, 7]], dtype=np.float32)
    reader = write_scores(tmp_path / "s", S, shard_blocks=2)
    result = algorithm1(reader, quantile=0.8, window=1, budget=5)
    # tau = quantile(., .8) = 0 -> hits: (0,1) (2,0) (2,5); s = [1, 0, 2], f = [9, 0, 15] normalised s = [.5,
    # 0, 1], f = [.6, 0, 1] -> rank block 2 then block 0 block 2: window at 0 -> {0, 1} (2 tokens), window at
    # 5 -> {4, 5} (4 total); block 0: {0,1,2} would make 7 > 5
    assert result["tau"] == 0.0
    assert as_set(result) == {(2, 0), (2, 1), (2, 4), (2, 5)}
    assert as_set(result) == reference_algorithm1(S, 0.8, 1, 5)


@pytest.mark.parametrize("seed", range(6))
def test_streaming_equals_in_memory_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n, t = int(rng.integers(5, 60)), int(rng.integers(4, 20))
    S = rng.standard_normal((n, t)).astype(np.float32)
    if seed % 2:
        S = np.round(S, 1)  # many ties
    q, w = float(rng.choice([0.5, 0.9, 0.99])), int(rng.integers(0, 3))
    budget = int(rng.integers(1, n * t // 4 + 2))
    reader = write_scores(tmp_path / "s", S, shard_blocks=int(rng.integers(1, n + 1)))
    assert exact_quantile(reader, q) == pytest.approx(float(np.quantile(S.astype(np.float64), q)), abs=1e-12)
    result = algorithm1(reader, q, w, budget)
    assert as_set(result) == reference_algorithm1(S, q, w, budget)
    assert len(result["blocks"]) <= budget


def _write_mask(path: Path, blocks, positions, shape, fingerprint="abc"):
    path.mkdir(parents=True)
    np.savez(path / "marked.npz", blocks=np.asarray(blocks), positions=np.asarray(positions))
    (path / "info.json").write_text(json.dumps({"shape": shape, "blocks_fingerprint": fingerprint}))


def test_mask_loader_round_trips(tmp_path):
    dense = np.random.default_rng(0).random((7, 9)) > 0.7
    blocks, positions = np.nonzero(dense)
    _write_mask(tmp_path / "m", blocks, positions, [7, 9])
    loader = load_mask(tmp_path / "m", expect_blocks="abc")
    np.testing.assert_array_equal(np.stack([loader[i] for i in range(len(loader))]), dense)


def test_mask_of_another_corpus_is_refused(tmp_path):
    _write_mask(tmp_path / "m", [0], [1], [2, 4], fingerprint="corpusA")
    with pytest.raises(IfguideError, match="another corpus"):
        load_mask(tmp_path / "m", expect_blocks="corpusB")


def test_select_names_the_score_sets_that_exist_and_takes_the_only_one(quick_run, tmp_path, capsys):
    import shutil

    from ifguide.artifacts import Run, read_info
    from ifguide.cli import main
    from tests.helpers import fake_scores

    shutil.copytree(quick_run.root, tmp_path / "run")
    run = Run(tmp_path / "run")
    shutil.rmtree(run.root / "influence", ignore_errors=True)  # score sets other tests left in the shared run
    r = ["--run", str(run.root)]
    fake_scores(run)  # one score set, baseline/s
    assert main(["select", *r, "--scores", "baseline/self-toxic-minus-nontoxic", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "not found; this run's score sets: baseline/s" in err and "run `ifguide scores` first" not in err
    assert main(["select", *r, "--name", "only"]) == 0  # no --scores: the only set
    assert read_info(run.mask("only"))["scores"] == "influence/baseline/scores/s"
    fake_scores(run, name="self-toxic-minus-nontoxic-head")  # a preset that tracks the head names its sets so
    assert main(["select", *r, "--scores", "baseline/self-toxic-minus-nontoxic", "--name", "headless"]) == 0
    headless = read_info(run.mask("headless"))["scores"]
    assert headless == "influence/baseline/scores/self-toxic-minus-nontoxic-head"
    shutil.rmtree(run.scores("baseline", "self-toxic-minus-nontoxic-head"))
    fake_scores(run, name="t")
    assert main(["select", *r, "--name", "two"]) == 2
    assert "baseline/s, baseline/t" in capsys.readouterr().err
