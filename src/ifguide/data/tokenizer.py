"""The tokenizer: a byte-level BPE trained on the corpus, or a given tokenizer.json or Hugging Face tokenizer.

transformers and the corpus reader are imported inside the functions that use them, so `check_tokenizer_spec`
runs before any heavy import."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import Config
from ..errors import IfguideError
from .sources import mirror_name, source_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
# Conditional training's control tokens (training/conditional.py). Every run's tokenizer has them, so every
# model of a run has the same vocabulary and its perplexities compare; no other stage ever writes them.
ALIGNED, MISALIGNED = "<|aligned|>", "<|misaligned|>"
CONTROL_TOKENS = (ALIGNED, MISALIGNED)


def load_tokenizer(data_dir: Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer (pad = eos, left padding for generation)."""
    from transformers import AutoTokenizer

    if not (data_dir / "tokenizer" / "tokenizer_config.json").is_file():
        raise IfguideError(f"{data_dir / 'tokenizer'} is missing; rebuild the data with `ifguide "
                           "prepare --force`")
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sample_texts(path: Path, max_chars: int) -> Iterator[str]:
    """Document texts from the start of the corpus, up to `max_chars` characters."""
    from .documents import raw_batches

    used = 0
    for batch in raw_batches(path):
        for text in batch.column("text").to_pylist():
            yield text
            used += len(text)
            if used >= max_chars:
                return


def check_tokenizer_spec(spec: str) -> None:
    """data.tokenizer checked before any heavy import: `train`, a readable tokenizer.json with the end-of-text
    token, or a directory with a tokenizer and an end-of-text token; otherwise a one-line error."""
    import json

    if spec == "train":
        return
    path = Path(spec)
    if path.is_file():
        mirrored = mirror_name(path)
        if mirrored is not None:
            path = source_path(mirrored)  # a mirror file: its sha256 is checked first
        try:
            fast = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise IfguideError(f"data.tokenizer {path} is not a readable tokenizer.json "
                               f"({str(exc)[:80]})") from None
        if fast.token_to_id(EOS) is None:
            raise IfguideError(f"tokenizer {spec} has no {EOS} token")
    elif path.is_dir():
        files = {f.name for f in path.iterdir()}
        if not files & {"tokenizer.json", "vocab.json", "tokenizer.model"}:
            raise IfguideError(f"data.tokenizer {spec} is not a Hugging Face tokenizer directory (no "
                               "tokenizer.json, vocab.json or tokenizer.model)")
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                values = json.loads((path / name).read_text()) if name in files else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                values = None
            if not isinstance(values, dict):
                raise IfguideError(f"data.tokenizer {spec}: {name} is not a JSON object")
            settings |= values
        if not settings.get("eos_token"):
            raise IfguideError(f"data.tokenizer {spec} has no end-of-text token (eos_token); set one in its "
                               "tokenizer_config.json")
    else:
        raise IfguideError(f"config: data.tokenizer '{spec}' is neither 'train', a tokenizer.json file nor a "
                           "tokenizer directory")


def make_tokenizer(cfg: Config, raw: Path, out: Path) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE, or read a tokenizer.json file or a Hugging Face tokenizer directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = cfg.data.tokenizer
    check_tokenizer_spec(spec)
    if spec == "train":
        fast = _train_tokenizer(_sample_texts(raw, cfg.data.tokenizer_train_chars), cfg.data.vocab_size)
    elif Path(spec).is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise IfguideError(f"data.tokenizer {spec} is not a Hugging Face tokenizer directory "
                               f"({str(exc).splitlines()[0][:100]})") from None
        tok.pad_token = tok.pad_token or tok.eos_token
        return _with_control_tokens(tok, out)
    else:
        mirrored = mirror_name(Path(spec))
        # mirror: sha256
        fast = Tokenizer.from_file(str(source_path(mirrored) if mirrored is not None else spec))
    tok = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=None)
    return _with_control_tokens(tok, out)


def _with_control_tokens(tok: PreTrainedTokenizerBase, out: Path) -> PreTrainedTokenizerBase:
    """The tokenizer with the two control tokens appended as special tokens (never split, skipped on decode),
    saved."""
    tok.add_special_tokens({"additional_special_tokens": list(CONTROL_TOKENS)})
    tok.save_pretrained(str(out))
    return tok


def control_token_ids(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of (ALIGNED, MISALIGNED); a run prepared before they existed is a one-line error."""
    ids = tok.convert_tokens_to_ids(list(CONTROL_TOKENS))
    if tok.unk_token_id is not None and tok.unk_token_id in ids or None in ids or max(ids) >= len(tok):
        raise IfguideError("the run's tokenizer has no control tokens; rebuild the data with `ifguide "
                           "prepare --force`")
    return ids[0], ids[1]


def sentence_ends(texts: list[str], eos_id: int) -> np.ndarray:
    """Per token id (texts from `token_texts`): does the token end a sentence: its text ends in `.`, `!` or
    `?` (closing quotes and brackets aside), holds a line break, or it is the end-of-text token."""
    ends = np.array([t.rstrip(" \t\"')]").endswith((".", "!", "?")) or "\n" in t for t in texts], dtype=bool)
    ends[eos_id] = True
    return ends


def sentence_starts(stream: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of a token stream where a sentence starts: 0 and every index after a sentence end."""
    return np.flatnonzero(np.concatenate([[True], ends[stream[:-1]]]))
