"""Per-token scores on disk: memory-mappable .npy shards with an info.json, written and read out of core."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..artifacts import Journal, damaged, load_array, read_info, write_json
from ..console import progress_bars_off
from ..errors import IfguideError


def check_finite(values: np.ndarray, where: str) -> None:
    """Refuse NaN or infinite scores: they would silently break the quantile and the ranking."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise IfguideError(f"{where} holds {bad:,} non-finite scores (NaN or inf); the model or factors are "
                           "broken: check the model's held-out loss, or raise influence.damping")


def write_shards(out: Path, shards: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int], dtype: str,
                 total: int | None = None, desc: str = "scores", journal: Journal | None = None) -> dict:
    """Save (first block, scores) shards as .npy files with an info.json that ScoreReader understands; a
    `journal` records each saved shard, and the shards it already holds (an interrupted build's) are kept."""
    entries = dict(journal.done) if journal is not None else {}
    total = shape[0] if total is None else total
    done = sum(entry["stop"] - entry["start"] for entry in entries.values())
    with tqdm(total=total, initial=done, desc=desc, unit="block", disable=progress_bars_off()) as progress:
        for start, values in shards:
            file = f"shard_{start:09d}.npy"
            check_finite(values, f"score shard {file}")
            np.save(out / file, np.asarray(values, dtype=dtype))
            entries[str(start)] = {"file": file, "start": start, "stop": start + len(values)}
            if journal is not None:
                journal.record(str(start), entries[str(start)])
            progress.update(len(values))
    info = {"shape": list(shape), "dtype": dtype, "shards": sorted(entries.values(),
                                                                   key=lambda e: e["start"])}
    write_json(out / "info.json", info)
    return info


PARTS = "parts"


def part_dir(scores: Path, part: tuple[int, int]) -> Path:
    """Where part I of N of a scores artifact lives: SCORES/parts/I-of-N."""
    return scores / PARTS / f"{part[0]}-of-{part[1]}"


def shard_range(n_blocks: int, shard_blocks: int, part: tuple[int, int]) -> tuple[int, int]:
    """The blocks [start, stop) of part I of N: a contiguous run of whole shards, so that every part scores
    the same batches as one process would."""
    i, n = part
    shards = -(-n_blocks // shard_blocks)
    return min(n_blocks, shards * i // n * shard_blocks), min(n_blocks, shards * (i + 1) // n * shard_blocks)


def _assemble_parts(path: Path) -> tuple[dict, list[Path]]:
    """The info and folders of a complete part set under SCORES/parts, or a one-line error naming what is
    missing."""
    parts = {}
    for folder in sorted((path / PARTS).glob("[!.]*-of-*")):  # not the hidden folders of unfinished builds
        info = read_info(folder)
        if info is not None:
            i, n = (int(x) for x in folder.name.split("-of-"))
            parts[(i, n)] = info
    totals = sorted({n for _, n in parts})
    if not totals:
        raise IfguideError(f"{path} holds no finished scores; run `ifguide scores` first")
    if len(totals) > 1:
        raise IfguideError(f"{path / PARTS} mixes part sets of {' and '.join(map(str, totals))} parts; "
                           "delete the stale ones")
    n = totals[0]
    missing = [f"{i}/{n}" for i in range(n) if (i, n) not in parts]
    if missing:
        raise IfguideError(f"scores {path} are incomplete: part(s) {', '.join(missing)} missing; run "
                           f"`ifguide scores --shard I/{n}` for each")
    sets = {info["set_fingerprint"] for info in parts.values()}
    if len(sets) > 1:
        raise IfguideError(f"the {n} parts under {path / PARTS} were computed from different inputs; rebuild "
                           "the stale parts with `ifguide scores --shard I/N --force`")
    first = parts[(0, n)]
    shards = [{**shard, "file": f"{PARTS}/{i}-of-{n}/{shard['file']}"} for i in range(n)
              for shard in parts[(i, n)]["shards"]]
    folders = [part_dir(path, (i, n)) for i in range(n)]
    return {**first, "shards": shards, "fingerprint": sets.pop(), "parts": n}, folders


class ScoreReader:
    """Lazy access to per-token score shards, from one process or from a complete set of parts (`scores
    --shard`): any block range, or shard by shard, via memory maps."""

    def __init__(self, path: Path):
        # folders: the artifacts the scores come from
        info, self.folders = read_info(path, fingerprinted=False), [path]
        if info is None:
            info, self.folders = _assemble_parts(path)
        self.path = path
        self.info = info
        self.shape = tuple(self.info["shape"])
        self.shards = self.info["shards"]

    def shard(self, k: int) -> np.ndarray:
        shard = self.shards[k]
        values = load_array(self.path, shard["file"], dtype=self.info["dtype"], mmap=True)
        if values.shape != (shard["stop"] - shard["start"], self.shape[1]):
            raise damaged(self.path, f"{shard['file']} holds {values.shape}, not "
                                     f"{(shard['stop'] - shard['start'], self.shape[1])}")
        return values

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for k, shard in enumerate(self.shards):
            yield shard["start"], self.shard(k)

    def blocks(self, start: int, stop: int) -> np.ndarray:
        """Scores of blocks [start, stop) as one array, reading only the shards that overlap."""
        parts = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
            if lo < hi:
                parts.append(np.asarray(self.shard(k)[lo - shard["start"]: hi - shard["start"]]))
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), dtype=self.info["dtype"])
