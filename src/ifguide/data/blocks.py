"""Block storage: fixed-length token blocks cut from the document stream, kept as Arrow (with per-token
provenance) and as a raw int32 array that every later stage memory-maps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset

from ..artifacts import Run, read_info
from ..errors import IfguideError
from ..names import TrainingData

ARROW = "data.arrow"


# all held-out pages; those neither labelled toxic nor hit by the blocklist; those the blocklist filter would
# have dropped (what the filter gives up)
HELDOUT_SETS = ("heldout", "heldout_benign", "heldout_blocklisted")


TOKEN_IDS = "input_ids.int32"  # the same token ids as a raw (n_blocks x block_size) array, for np.memmap


def load_blocks(data_dir: Path, variant: str = "blocks") -> Dataset:
    """Training blocks (`blocks`), the blocklist-filtered corpus (`blocks_filter`) or held-out blocks,
    memory-mapped."""
    path = data_dir / variant / ARROW
    if not path.is_file():
        raise IfguideError(f"{path} is missing; run `ifguide prepare` first")
    return Dataset.from_file(str(path))


def load_block_ids(data_dir: Path, variant: str = "blocks") -> np.ndarray:
    """The token ids of a block set as a read-only, memory-mapped (n_blocks, block_size) int32 array:
    training, factors and scores page them in from disk instead of holding the corpus in memory."""
    path = data_dir / variant / TOKEN_IDS
    if not path.is_file():
        raise IfguideError(f"{path} is missing; run `ifguide prepare` first (or `--force` for "
                           "data of older code)")
    block = read_info(data_dir)["summary"]["block_size"]
    if not path.stat().st_size:
        return np.zeros((0, block), dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r").reshape(-1, block)


def load_documents(data_dir: Path) -> Dataset:
    """The training documents (doc_id, source, text, num_tokens, blocklisted, toxic_label), memory-mapped."""
    return load_blocks(data_dir, "documents")


# --data -> its block set
TRAINING_DATA: dict[TrainingData, str] = {"full": "blocks", "filter": "blocks_filter"}


def training_blocks(data_info: dict, data: str) -> tuple[str, str]:
    """(block set, fingerprint) of the training data `full` or `filter` (the blocklist-filtered corpus)."""
    if data not in TRAINING_DATA:
        raise IfguideError(f"--data {data}: use one of {', '.join(TRAINING_DATA)}")
    key = "blocks_fingerprint" if data == "full" else "filter_blocks_fingerprint"
    if key not in data_info:
        raise IfguideError("the run's data predates filtered-block fingerprints; rebuild it with `ifguide "
                           "prepare --force`")
    return TRAINING_DATA[data], data_info[key]


def blocks_fingerprint(data_dir: Path) -> str:
    """The fingerprint tying scores and masks to one corpus of blocks."""
    info = read_info(data_dir)
    if info is None:
        raise IfguideError(f"{data_dir} is missing; run `ifguide prepare` first")
    return info["blocks_fingerprint"]


class ArrowSink:
    """Columns appended batch by batch to one Arrow file: a stream (Dataset.from_file maps it) or, with
    `random_access`, an IPC file whose batches can be read one at a time."""

    def __init__(self, path: Path, schema: pa.Schema, random_access: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.file = pa.OSFile(str(path), "wb")
        self.writer = (pa.ipc.new_file if random_access else pa.ipc.new_stream)(self.file, schema)
        self.batches = 0

    def write(self, columns: dict) -> None:
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.batches += 1

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def _lists(flat: np.ndarray, width: int) -> pa.ListArray:
    """Rows of `width` values from a flat array, as an Arrow list column."""
    offsets = np.arange(0, len(flat) + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array(flat))


class BlockCutter:
    """Concatenates documents (each ending in EOS) and writes fixed-length blocks, carrying the remainder
    over; with provenance, every token also carries its document, source and blocklisted-word ids."""

    def __init__(self, path: Path, block: int, provenance: bool = True):
        types = {"input_ids": pa.int32()}
        if provenance:
            types.update(doc_ids=pa.int32(), source_ids=pa.int16(), blocklist_word=pa.int16(),
                         char_start=pa.int32(),
                         char_end=pa.int32())
        self.sink = ArrowSink(path / ARROW, pa.schema([(name, pa.list_(t)) for name, t in types.items()]))
        self.token_ids = open(path / TOKEN_IDS, "wb")
        self.block = block
        self.carry = {name: np.zeros(0, dtype=t.to_pandas_dtype()) for name, t in types.items()}
        self.blocks = self.tokens = 0  # blocks written, tokens added
        self.digest = hashlib.sha256()

    def add(self, columns: dict[str, np.ndarray]) -> None:
        joined = {name: np.concatenate([self.carry[name], columns[name].astype(carry.dtype, copy=False)])
                  for name, carry in self.carry.items()}
        self.tokens += len(columns["input_ids"])
        cut = len(joined["input_ids"]) // self.block * self.block
        if cut:
            self.sink.write({name: _lists(values[:cut], self.block) for name, values in joined.items()})
            token_bytes = joined["input_ids"][:cut].tobytes()
            self.digest.update(token_bytes)
            self.token_ids.write(token_bytes)
            self.blocks += cut // self.block
        self.carry = {name: values[cut:] for name, values in joined.items()}

    def close(self) -> int:
        self.sink.close()
        self.token_ids.close()
        return self.blocks


DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.int32()), ("source", pa.string()), ("text", pa.string()),
                              ("num_tokens", pa.int32()), ("blocklisted", pa.bool_()),
                              ("toxic_label", pa.bool_()), ("source_index", pa.int64())])


def block_array(run: Run, variant: str = "blocks") -> np.ndarray:
    """The token ids of a block set (blocks, blocks_filter, heldout_blocks, wikitext_blocks),
    memory-mapped."""
    return load_block_ids(run.data(), variant)
