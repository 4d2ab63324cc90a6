"""Per-token scores on disk: memory-mappable .npy shards with an info.json, written and read out of core."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..artifacts import progress_bars_off, read_info, write_json
from ..errors import IfguideError


def check_finite(values: np.ndarray, where: str) -> None:
    """Refuse NaN or infinite scores: they would silently break the quantile and the ranking."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise IfguideError(f"{where} holds {bad:,} non-finite scores (NaN or inf); the model or factors are "
                           "broken: check the model's held-out loss, or raise influence.damping")


def write_shards(out: Path, shards: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int], dtype: str,
                 desc: str = "scores") -> dict:
    """Save (first block, scores) shards as .npy files with an info.json that ScoreReader understands."""
    entries = []
    with tqdm(total=shape[0], desc=desc, unit="block", disable=progress_bars_off()) as progress:
        for start, values in shards:
            file = f"shard_{start:09d}.npy"
            check_finite(values, f"score shard {file}")
            np.save(out / file, np.asarray(values, dtype=dtype))
            entries.append({"file": file, "start": start, "stop": start + len(values)})
            progress.update(len(values))
    info = {"shape": list(shape), "dtype": dtype, "shards": entries}
    write_json(out / "info.json", info)
    return info


class ScoreReader:
    """Lazy access to per-token score shards: any block range, or shard by shard, via memory maps."""

    def __init__(self, path: Path):
        info = read_info(path)
        if info is None:
            raise IfguideError(f"{path} holds no finished scores; run `ifguide scores` first")
        self.path = path
        self.info = info
        self.shape = tuple(self.info["shape"])
        self.shards = self.info["shards"]

    def shard(self, k: int) -> np.ndarray:
        return np.load(self.path / self.shards[k]["file"], mmap_mode="r")

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
