"""The mask artifact (`marked.npz`: sparse block and position indices): written once here, read as dense
per-block rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import load_array, read_info
from ..errors import IfguideError


class MaskLoader:
    """The dense per-block mask (bool, block_size) of a sparse mask artifact, built row by row."""

    def __init__(self, path: Path, expect_blocks: str | None = None):
        info = read_info(path, fingerprinted=False)
        if info is None:
            raise IfguideError(f"{path} holds no finished mask; run `ifguide select` first")
        if expect_blocks is not None and info["blocks_fingerprint"] != expect_blocks:
            raise IfguideError(f"mask {path} was selected on another corpus of blocks "
                               f"({info['blocks_fingerprint']} != {expect_blocks}); select "
                               "again for this run")
        sparse = load_array(path, MASK_FILE)
        self.blocks, self.positions = sparse["blocks"], sparse["positions"]
        self.n_blocks, self.block_size = info["shape"]
        self.pointers = np.searchsorted(self.blocks, np.arange(self.n_blocks + 1))
        self.info = info

    def __len__(self) -> int:
        return self.n_blocks

    def dense(self) -> np.ndarray:
        """The whole mask as one (n_blocks, block_size) bool array."""
        rows = np.zeros((self.n_blocks, self.block_size), dtype=bool)
        rows[self.blocks, self.positions] = True
        return rows

    def __getitem__(self, i: int) -> np.ndarray:
        row = np.zeros(self.block_size, dtype=bool)
        row[self.positions[self.pointers[i]: self.pointers[i + 1]]] = True
        return row


MASK_FILE = "marked.npz"


def save_mask(folder: Path, blocks: np.ndarray, positions: np.ndarray) -> None:
    """Write the marked (block, position) pairs of a mask into its build folder."""
    np.savez(folder / MASK_FILE, blocks=np.asarray(blocks).astype(np.int64),
             positions=np.asarray(positions).astype(np.int32))


def load_mask(path: Path, expect_blocks: str | None = None) -> MaskLoader:
    """A mask loader; refuses a mask selected on another corpus of blocks."""
    return MaskLoader(path, expect_blocks)
