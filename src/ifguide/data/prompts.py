"""Evaluation prompt sets: the built-in ones `prepare` wrote, or a user's JSONL file, read and checked (no
torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..artifacts import Run, write_text
from ..errors import IfguideError

BUILTIN_PROMPTS = ("rtp", "bold", "toxigen", "attaq")


def load_prompts(run: Run, prompts: str) -> tuple[str, list[dict]]:
    """(set name, rows) for a built-in set or a user JSONL file of {"prompt": str, "toxic": bool?}."""
    path = run.data() / "prompts" / f"{prompts}.jsonl" if prompts in BUILTIN_PROMPTS else Path(prompts)
    if not path.is_file():
        raise IfguideError(f"prompts '{prompts}' not found: use {', '.join(BUILTIN_PROMPTS)} or a JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IfguideError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise IfguideError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise IfguideError(f'{path}:{number} must be an object with a "prompt" string')
        if not row["prompt"].strip():
            raise IfguideError(f'{path}:{number}: "prompt" is empty')
        if row.get("toxic") is not None and not isinstance(row["toxic"], bool):
            raise IfguideError(f'{path}:{number}: "toxic" must be true, false or null')
        rows.append({"prompt": row["prompt"], "toxic": row.get("toxic")})
    if not rows:
        raise IfguideError(f"{path} holds no prompts")
    if prompts in BUILTIN_PROMPTS:
        return prompts, rows
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]  # a user file's identity is its content
    return f"{path.stem.lstrip('.') or 'prompts'}-{digest}", rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path, rebuild: str = "rebuild the data with `ifguide prepare --force`") -> list[dict]:
    """The rows of a JSONL file a stage wrote (by default `prepare`); a one-line error saying how to `rebuild`
    it when it is missing."""
    if not path.is_file():
        raise IfguideError(f"{path} is missing; {rebuild}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
