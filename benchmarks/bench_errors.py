"""How long a user mistake takes to be reported: each command below runs in a fresh process and fails in one
line.

Goal: under 1 s each (the mistakes are checked before torch, transformers and datasets are imported).
    python benchmarks/bench_errors.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def mistakes(root: Path) -> dict[str, list[str]]:
    """Name -> ifguide arguments of one mistake, with the files it needs written under `root`."""
    (root / "folder").mkdir()
    (root / "no-eos").mkdir()
    (root / "no-eos" / "tokenizer.json").write_text("{}")
    (root / "no-eos" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (root / "garbage.json").write_text("not a tokenizer")

    def config(name: str, **data) -> str:
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"base": "quick", "data": data}))
        return str(root / f"{name}.yaml")

    prepare = ["prepare", "--run", str(root / "run"), "--config"]
    return {
        "corpus glob matching nothing": prepare + [config("a", corpus=[{"path": str(root / "x/*.jsonl"),
                                                                          "source": "s"}])],
        "folder given as the corpus": prepare + [config("b", corpus=[{"path": str(root / "folder"),
                                                                      "source": "s"}])],
        "tokenizer folder without a tokenizer": prepare + [config("c", tokenizer=str(root / "folder"))],
        "tokenizer without end-of-text": prepare + [config("d", tokenizer=str(root / "no-eos"))],
        "garbage tokenizer.json": prepare + [config("e", tokenizer=str(root / "garbage.json"))],
        "unknown preset": prepare + ["nonexistent-preset"],
        "train on a missing run": ["train", "--run", str(root / "missing"), "--name", "m"],
    }


def main() -> None:
    executable = shutil.which("ifguide") or str(Path(sys.executable).parent / "ifguide")
    with tempfile.TemporaryDirectory() as folder:
        for name, argv in mistakes(Path(folder)).items():
            start = time.perf_counter()
            done = subprocess.run([executable, *argv], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            print(f"{seconds:5.2f} s  exit {done.returncode}  {name}: {done.stderr.strip()[:90]}")


if __name__ == "__main__":
    main()
