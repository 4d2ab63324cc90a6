"""The training blocks as a torch Dataset, for the Trainer and for Kronfluence."""

from __future__ import annotations

import numpy as np
import torch


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length training blocks as (input_ids, labels[, suppress]) with an optional dense mask; tokens in
    `unlabelled` (control tokens) get label -100, so no position learns to predict them."""

    def __init__(self, input_ids: np.ndarray, suppress: np.ndarray | None = None,
                 unlabelled: tuple[int, ...] = ()):
        self.input_ids = input_ids
        self.suppress = suppress
        self.unlabelled = torch.tensor(unlabelled, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        # a copy: the blocks are read-only maps
        ids = torch.from_numpy(np.array(self.input_ids[i], dtype=np.int64))
        item = {"input_ids": ids, "labels": ids.masked_fill(torch.isin(ids, self.unlabelled), -100)}
        if self.suppress is not None:
            item["suppress"] = torch.from_numpy(np.array(self.suppress[i], dtype=bool))
        return item
