"""Every stage's output, digested per computation version: an arithmetic change without a version bump fails
here.

The test builds a small run through every stage and compares a digest of each stage's artifacts (exact hashes
of tokens, texts and masks; sums of |x| and x² of weights, factors and scores, to a tolerance) with the digest
stored in stage_digests.json for the stage's current number in COMPUTATION_VERSIONS. After bumping a number on
purpose, record the new digests: `python -m tests.artifacts.test_stage_digests`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ifguide.artifacts import COMPUTATION_VERSIONS, Run
from ifguide.cli import main

STORED = Path(__file__).with_name("stage_digests.json")
EXACT = (".int32", ".jsonl", ".npz")  # integer and text outputs: equal byte for byte
NUMERIC = (".safetensors", ".npy")  # float outputs: equal to a relative tolerance
TOLERANCE = 1e-4


def build_digest_run(root: Path) -> Run:
    """A run of the quick preset through every stage, with fewer DPO prompts and queries to fit CI."""
    run = Run(root)
    cfg = yaml.safe_load((Path(__file__).parents[2] / "src/ifguide/presets/quick.yaml").read_text())
    cfg["data"]["num_dpo_prompts"] = 24
    cfg["reward"] = {"epochs": 0.3}
    cfg["queries"] = {"labeller": "profanity-check", "samples_per_prompt": 2, "max_prompts": 24}
    (root.parent / "digest.yaml").write_text(yaml.safe_dump(cfg))
    r = ["--run", str(root)]
    steps = [
        ["prepare", "--config", str(root.parent / "digest.yaml")],
        ["train", "--name", "baseline"],
        ["factors", "--model", "baseline"],
        ["scores", "--model", "baseline", "--queries", "rtp", "--name", "rtp"],
        ["select", "--scores", "rtp", "--name", "ifguide"],
        ["train", "--name", "ifguide", "--mask", "ifguide"],
        ["eval", "--model", "ifguide"],
        ["queries", "--model", "baseline", "--name", "self"],
        ["reward"],
        ["dpo", "--name", "dpo", "--init", "baseline"],
    ]
    for argv in steps:
        assert main([argv[0], *r, *argv[1:]]) == 0, argv
    return run


def artifacts_of(run: Run) -> dict[str, list[Path]]:
    """Each stage's artifact folders in the digest run."""
    scores = run.scores("baseline", "rtp")
    return {
        "prepare": [run.data()],
        "train": [run.model("baseline"), run.model("ifguide"), run.model("dpo")],
        "factors": [run.factors("baseline")],
        "direction": sorted(run.root.glob("influence/baseline/directions/*")),
        "scores": [scores],
        "select": [run.mask("ifguide")],
        "eval": [run.eval("ifguide", "rtp")],
        "queries": [run.queries("self")],
        "reward": [run.reward()],
        "preferences": [run.preferences("baseline")],
    }


def digest(folders: list[Path]) -> dict[str, str | list[float]]:
    """file -> sha256 (integer and text outputs) or [sum |x|, sum x²] (float outputs) for every file of
    `folders`."""
    out: dict[str, str | list[float]] = {}
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            name = f"{folder.name}/{file.relative_to(folder)}"
            if file.suffix in EXACT or file.name == "tokenizer.json":
                out[name] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
            elif file.suffix in NUMERIC:
                out[name] = _moments(file)
    return out


def _moments(file: Path) -> list[float]:
    if file.suffix == ".npy":
        arrays = [np.load(file)]
    else:
        from safetensors.numpy import load_file

        arrays = [a for a in load_file(str(file)).values() if a.dtype.kind == "f"]
    values = [np.asarray(a, dtype=np.float64) for a in arrays]
    return [float(sum(np.abs(v).sum() for v in values)), float(sum((v * v).sum() for v in values))]


def differences(stored: dict, current: dict) -> list[str]:
    """The files whose digests differ (beyond TOLERANCE for float outputs), or that appeared or went."""
    found = [f"{name}: {'missing' if name not in current else 'new'}"
             for name in sorted(set(stored) ^ set(current))]
    for name in sorted(set(stored) & set(current)):
        a, b = stored[name], current[name]
        same = a == b if isinstance(a, str) else \
            all(math.isclose(x, y, rel_tol=TOLERANCE) for x, y in zip(a, b))
        if not same:
            found.append(f"{name}: {a} -> {b}")
    return found


def record(run: Run) -> dict:
    """The digests of every stage of `run` under its current computation version."""
    return {stage: {"version": COMPUTATION_VERSIONS[stage], "files": digest(folders)}
            for stage, folders in artifacts_of(run).items()}


@pytest.mark.slow
def test_each_stage_computes_what_its_version_recorded(tmp_path):
    stored = json.loads(STORED.read_text())
    assert set(stored) == set(COMPUTATION_VERSIONS), "every stage has a stored digest"
    current = record(build_digest_run(tmp_path / "run"))
    failures = []
    for stage, entry in current.items():
        if stored[stage]["version"] != entry["version"]:
            failures.append(f"{stage}: version {entry['version']} has no stored digest (stored: version "
                            f"{stored[stage]['version']}); record it with `python -m {__name__}`")
        elif changed := differences(stored[stage]["files"], entry["files"]):
            failures.append(f"{stage} (version {entry['version']}) computes something else: bump its number "
                            "in COMPUTATION_VERSIONS if that is meant, then record; "
                            + "; ".join(changed[:3]))
    assert not failures, "\n".join(failures + ["(a stage that reads a changed one differs too: the change is "
                                               "in the earliest stage of the data flow listed)"])


if __name__ == "__main__":  # record the digests of the current versions
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        STORED.write_text(json.dumps(record(build_digest_run(Path(folder) / "run")), indent=1) + "\n")
    print(f"recorded {STORED}", file=sys.stderr)
