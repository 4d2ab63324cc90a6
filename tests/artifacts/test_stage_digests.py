"""Every stage's output, digested per computation version: an arithmetic change without a version bump fails
here, and the message names the earliest stage that changed.

The test builds a small run through every stage and compares a digest of each stage's artifacts with the one
stored in stage_digests.json for the stage's current number in COMPUTATION_VERSIONS.
- Exact: what is deterministic on every CPU (tokens, masks, Arrow tables, integer tensors, texts that no
  sampling produced).
- To 1e-4 of the norm: float tensors, as their norm and three fixed random projections, which a flipped sign
  or a reordering changes. Eigenvectors, defined only up to sign and rotation, as Q diag(λ) Qᵀ; a fine-tuned
  model as its change from the model it started from, so a step that changes nothing fails.
- To 1e-4: training logs, and the numbers of results.json files that no sampling reaches (perplexities,
  LAMBADA).
- Sampled texts pass through last-bit differences between CPUs: each line is hashed, at least 80% must
  match, and equal texts must have equal scores. What is computed from sampled texts (the DPO model, the
  other numbers of eval's and the report's results.json) is compared to 1e-4 when every sampled text is as
  recorded, and loosely otherwise (SAMPLED_TOLERANCE, SAMPLED_METRIC_TOLERANCE).

After bumping a number on purpose, record the bumped stages: `python -m tests.artifacts.test_stage_digests`
(`--all` re-records every stage); the same command adds the files of artifacts newly added to the digest run,
and keeps every stored digest of an unbumped stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from ifguide.artifacts import COMPUTATION_VERSIONS, Run
from ifguide.cli import main
from tests.helpers import is_wall_time

STORED = Path(__file__).with_name("stage_digests.json")
EXACT = (".int32", ".npz")  # integer outputs: equal byte for byte
NUMERIC = (".safetensors", ".npy")  # float outputs: equal to TOLERANCE of their norm
SAMPLED = ("generations.jsonl", "samples.jsonl", "pairs.jsonl")  # texts that sampling produced
LOGS = ("train_log.json",)  # loss histories: equal to TOLERANCE
METRICS = ("results.json",)  # eval's and the report's numbers: per key path, sampled or not (UNSAMPLED)
UNSAMPLED = ("perplexity", "ppl", "lambada", "last_token", "last_word", "token_share", "human_text", "steps",
             "epochs")  # key-path parts of numbers no sampled text reaches: equal to TOLERANCE
TOLERANCE = 1e-4
SAMPLED_MATCH = 0.8  # share of sampled lines that must be equal on any CPU
SAMPLED_TOLERANCE = 0.02  # a model fine-tuned on sampled pairs (DPO): its change and log, relative
SAMPLED_METRIC_TOLERANCE = 0.1  # metrics over sampled texts (EMT, shares, intervals), relative or absolute


def build_digest_run(root: Path) -> Run:
    """A run of the quick preset through every stage, with fewer DPO prompts and queries to fit CI."""
    run = Run(root)
    cfg = yaml.safe_load((Path(__file__).parents[2] / "src/ifguide/presets/quick.yaml").read_text())
    cfg["data"]["num_dpo_prompts"] = 24
    cfg["reward"] = {"epochs": 0.3}
    cfg["queries"] = {"labeller": "profanity-check", "samples_per_prompt": 2, "max_prompts": 24}
    (root.parent / "digest.yaml").write_text(yaml.safe_dump(cfg))
    r = ["--run", str(root)]
    spans = root.parent / "ifguide-spans.jsonl"  # exported, then imported: the import is digested
    steps = [
        ["prepare", "--config", str(root.parent / "digest.yaml")],
        ["train", "--name", "baseline"],
        ["factors", "--model", "baseline"],
        ["scores", "--model", "baseline", "--queries", "rtp", "--name", "rtp"],
        ["select", "--scores", "rtp", "--name", "ifguide"],
        ["train", "--name", "ifguide", "--mask", "ifguide"],
        ["select", "--method", "blocklist-tokens", "--name", "blocklist"],
        ["train", "--name", "unlikely", "--mask", "blocklist", "--objective", "unlikelihood"],
        ["select", "--method", "labelled-documents", "--name", "clean"],
        ["train", "--name", "clean", "--mask", "clean", "--objective", "drop"],
        ["select", "--scores", "rtp", "--method", "documents", "--budget", "0.1", "--name", "documents"],
        ["train", "--name", "documents-mask", "--mask", "documents", "--objective", "mask"],
        ["select", "--method", "sentence-labels", "--name", "sentences"],
        ["train", "--name", "conditional", "--mask", "sentences", "--objective", "conditional"],
        ["eval", "--model", "ifguide"],
        ["queries", "--model", "baseline", "--name", "self"],
        ["reward"],
        ["eval", "--model", "ifguide", "--decoding", "rad"],
        ["dpo", "--name", "dpo", "--init", "baseline"],
        ["export-mask", "--mask", "ifguide", "--out", str(spans)],
        ["import-mask", "--spans", str(spans), "--name", "imported"],
        ["report"],
    ]
    for argv in steps:
        assert main([argv[0], *r, *argv[1:]]) == 0, argv
    return run


def artifacts_of(run: Run) -> list[tuple[str, Path]]:
    """(stage, artifact folder) of the digest run, in the order of the data flow."""
    return [("prepare", run.data()), ("train", run.model("baseline")), ("factors", run.factors("baseline")),
            *(("direction", d) for d in sorted(run.root.glob("influence/baseline/directions/*"))),
            ("scores", run.scores("baseline", "rtp")), ("select", run.mask("ifguide")),
            *(("select", run.mask(name)) for name in ("blocklist", "clean", "documents", "sentences")),
            ("select", run.mask("imported")),
            ("train", run.model("ifguide")), ("train", run.model("unlikely")),
            ("train", run.model("clean")), ("train", run.model("documents-mask")),
            ("train", run.model("conditional")),
            ("eval", run.eval("ifguide", "rtp")), ("queries", run.queries("self")), ("reward", run.reward()),
            ("eval", run.eval("ifguide-rad", "rtp")), ("preferences", run.preferences("baseline")),
            ("dpo", run.model("dpo")), ("eval", run.report())]


def digest(folders: list[Path], root: Path) -> dict[str, str | list]:
    """file (relative to `root`) -> its digest (module doc), for every file of `folders`."""
    out: dict[str, str | list] = {}
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            name = str(file.relative_to(root))
            if file.name in SAMPLED:
                out[name] = ["lines", *(_line_digest(line) for line in file.read_text().splitlines())]
            elif file.name in METRICS:
                out[name] = ["metrics", *_metrics(json.loads(file.read_text()))]
            elif file.suffix == ".arrow":
                out[name] = _arrow_digest(file)
            elif file.name in LOGS:
                kind = "sampled-log" if _fine_tuned(folder) else "log"
                out[name] = [kind, *_numbers(json.loads(file.read_text()))]
            elif file.suffix in EXACT or file.suffix == ".jsonl" or file.name == "tokenizer.json":
                out[name] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
            elif file.suffix in NUMERIC:
                out[name] = _tensor_digest(file, start=_init_weights(folder, file))
    return out


def _line_digest(line: str) -> list:
    """[a hash of a JSON line's strings, its numbers]: a sampled text, and the scores given to it."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict | list):
            for item in (value.values() if isinstance(value, dict) else value):
                yield from strings(item)
    record = json.loads(line)
    return [hashlib.sha256("\x00".join(strings(record)).encode()).hexdigest()[:12], *_numbers(record)]


def _numbers(value, key: str = "") -> list[float]:
    """Every number of a JSON value, in order, except wall times."""
    return [x for _, x in _paths(value, key)]


def _paths(value, path: str = "") -> list[tuple[str, float]]:
    """(key path, number) of every number of a JSON value, in key order, except wall times."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _paths(value[k], f"{path}/{k}")]
    if isinstance(value, list):
        return [x for item in value for x in _paths(item, path)]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    wall = any(is_wall_time(key) for key in path.split("/"))
    return [(path, float(value))] if number and not wall else []


def _metrics(value) -> list[list[float]]:
    """[numbers no sampling reaches, numbers measured on sampled texts] of a results file (module doc)."""
    pairs = _paths(value)
    exact = [x for path, x in pairs if any(part in path for part in UNSAMPLED)]
    return [exact, [x for path, x in pairs if not any(part in path for part in UNSAMPLED)]]


def _arrow_digest(file: Path) -> str:
    """A hash of an Arrow table's columns (not of the file, whose metadata may differ)."""
    import pyarrow as pa

    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return hashlib.sha256(json.dumps(table.to_pydict(), sort_keys=True).encode()).hexdigest()[:16]


def _fine_tuned(folder: Path) -> str | None:
    """The model a fine-tuned model started from (its recipe's init, a model of the run), else None."""
    info = folder / "info.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("recipe", {}).get("config", {}).get("init")


def _init_weights(folder: Path, file: Path) -> dict[str, np.ndarray] | None:
    """The weights a fine-tuned model started from, else None."""
    init = _fine_tuned(folder)
    if not init or file.name != "model.safetensors":
        return None
    from safetensors.numpy import load_file

    return load_file(str(folder.parent / init / file.name))


def _tensors(file: Path) -> dict[str, np.ndarray]:
    if file.suffix == ".npy":
        return {"": np.load(file)}
    from safetensors.numpy import load_file

    return load_file(str(file))


def _tensor_digest(file: Path, start: dict[str, np.ndarray] | None = None) -> list:
    """[norm, three projections] of the file's float tensors, concatenated in key order (minus `start`, the
    weights a fine-tuning began from), plus a hash of its integer tensors; eigenvectors as Q diag(λ) Qᵀ."""
    tensors = _tensors(file)
    if "eigenvectors" in file.name:
        values = _tensors(file.with_name(file.name.replace("eigenvectors", "eigenvalues")))
        tensors = {k: (q * values[k].astype(np.float64)) @ q.T.astype(np.float64) for k, q in tensors.items()}
    floats, integers = [], hashlib.sha256()
    for key in sorted(tensors):
        array = tensors[key]
        if array.dtype.kind == "f":
            flat = np.asarray(array, dtype=np.float64).reshape(-1)
            floats.append(flat - start[key].reshape(-1) if start is not None else flat)
        else:
            integers.update(key.encode() + np.ascontiguousarray(array).tobytes())
    vector = np.concatenate(floats) if floats else np.zeros(0)
    rng = np.random.default_rng(zlib.crc32(file.name.encode()))
    projections = [float(rng.standard_normal(len(vector)) @ vector / math.sqrt(max(len(vector), 1)))
                   for _ in range(3)]
    kind = "tensor" if start is None else "delta"
    return [kind, float(np.linalg.norm(vector)), *projections, integers.hexdigest()[:16]]


def differences(stored: dict, current: dict, texts_equal: bool = False) -> list[str]:
    """The files whose digests differ (module doc), or that appeared or went; `texts_equal`: every sampled
    text of the run is as stored, so what was computed from sampled texts must be equal to TOLERANCE too."""
    found = [f"{name}: {'missing' if name not in current else 'new'}"
             for name in sorted(set(stored) ^ set(current))]
    for name in sorted(set(stored) & set(current)):
        if not _same(stored[name], current[name], texts_equal):
            found.append(f"{name}: {_first_difference(stored[name], current[name])}")
    return found


def _first_difference(a, b, at: str = "") -> str:
    """Where two digests first differ, and how: 'a -> b', or for lists 'kind[i][j]: x -> y'."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
        k = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        return _first_difference(a[k], b[k], f"{at or a[0]}[{k}]")
    return f"{at + ': ' if at else ''}{str(a)[:60]} -> {str(b)[:60]}"


def sampled_texts_equal(stored: dict, current: dict) -> bool:
    """Whether every sampled line of every stage has the text it had when recorded."""
    def texts(digests: dict) -> dict:
        return {name: [line[0] for line in value[1:]] for entry in digests.values()
                for name, value in entry["files"].items() if isinstance(value, list) and value[0] == "lines"}
    return texts(stored) == texts(current)


def _same(a: str | list, b: str | list, texts_equal: bool = False) -> bool:
    if isinstance(a, str) or isinstance(b, str) or a[0] != b[0]:
        return a == b
    if a[0] == "lines":  # most texts equal, and equal texts scored equally
        same = [(x, y) for x, y in zip(a[1:], b[1:]) if x[0] == y[0]]
        return (len(a) == len(b) and len(same) >= SAMPLED_MATCH * (len(a) - 1)
                and all(_close(x[1:], y[1:], TOLERANCE) for x, y in same))
    if a[0] == "metrics":
        return _close(a[1], b[1], TOLERANCE) and _close(a[2], b[2], TOLERANCE if texts_equal
                                                        else SAMPLED_METRIC_TOLERANCE)
    sampled = a[0] in ("delta", "sampled-log") and not texts_equal
    tolerance = SAMPLED_TOLERANCE if sampled else TOLERANCE
    if a[0] in ("log", "sampled-log"):
        return _close(a[1:], b[1:], tolerance)
    norm = max(a[1], b[1])
    return a[-1] == b[-1] and all(abs(x - y) <= tolerance * norm for x, y in zip(a[1:-1], b[1:-1]))


def _close(a: list[float], b: list[float], tolerance: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance)
                                    for x, y in zip(a, b))


def record(run: Run) -> dict:
    """The digests of every stage of `run` under its current computation version."""
    stages = dict.fromkeys(stage for stage, _ in artifacts_of(run))
    return {stage: {"version": COMPUTATION_VERSIONS[stage],
                    "files": digest([f for s, f in artifacts_of(run) if s == stage], run.root)}
            for stage in stages}


def flow_rank(run: Run, changed: list[str]) -> int:
    """How early in the data flow the first of the changed files is made."""
    folders = [str(folder.relative_to(run.root)) for _, folder in artifacts_of(run)]
    return min(k for name in changed for k, folder in enumerate(folders) if name.startswith(folder + "/"))


def test_recording_keeps_the_stored_digests_of_unbumped_stages():
    stored = {"a": {"version": 1, "files": {"x": "1"}}, "b": {"version": 1, "files": {"y": "1"}}}
    current = {"a": {"version": 1, "files": {"x": "2", "new": "3"}}, "b": {"version": 2, "files": {"y": "4"}}}
    digests, bumped = recorded(stored, current)
    assert bumped == ["b"] and digests["b"] == current["b"]
    assert digests["a"] == {"version": 1, "files": {"x": "1", "new": "3"}}  # the stored digest of x stays
    assert recorded(stored, current, every_stage=True)[0] == current


def test_what_sampled_texts_reach_is_exact_only_while_every_text_is_as_recorded():
    lines = {"version": 1, "files": {"g.jsonl": ["lines", ["t1", 0.5], ["t2", 0.25]]}}
    other_text = {"version": 1, "files": {"g.jsonl": ["lines", ["t1", 0.5], ["t3", 0.75]]}}
    metrics = {"r.json": ["metrics", [100.0], [0.40]]}
    drifted = {"r.json": ["metrics", [100.0], [0.43]]}
    assert sampled_texts_equal({"eval": lines}, {"eval": lines})
    assert not sampled_texts_equal({"eval": lines}, {"eval": other_text})
    assert differences(metrics, drifted, texts_equal=True) == ["r.json: metrics[2][0]: 0.4 -> 0.43"]
    assert differences(metrics, drifted, texts_equal=False) == []
    perplexity_moved = {"r.json": ["metrics", [100.1], [0.40]]}  # no sampling reaches it: always exact
    assert differences(metrics, perplexity_moved) == ["r.json: metrics[1][0]: 100.0 -> 100.1"]
    scored_apart = ["lines", ["t1", 0.5], ["t2", 0.3]]  # the same text, another score: a scorer changed
    assert differences(lines["files"], {"g.jsonl": scored_apart}) == ["g.jsonl: lines[2][1]: 0.25 -> 0.3"]


@pytest.mark.slow
def test_each_stage_computes_what_its_version_recorded(tmp_path):
    stored = json.loads(STORED.read_text())
    assert set(stored) == set(COMPUTATION_VERSIONS), "every stage has a stored digest"
    run = build_digest_run(tmp_path / "run")
    current = record(run)
    failures, texts_equal = [], sampled_texts_equal(stored, current)
    for stage, entry in current.items():
        if stored[stage]["version"] != entry["version"]:
            failures.append((-1, f"{stage}: version {entry['version']} has no stored digest (stored: version "
                                 f"{stored[stage]['version']}); record it with `python -m {__name__}`"))
        elif changed := differences(stored[stage]["files"], entry["files"], texts_equal):
            failures.append((flow_rank(run, [c.split(":")[0] for c in changed]),
                             f"{stage} (version {entry['version']}) computes something else: bump its number "
                             "in COMPUTATION_VERSIONS if that is meant, then record; "
                             + "; ".join(changed[:3])))
    assert not failures, "\n".join([message for _, message in sorted(failures)]
                                   + ["(listed in the order of the data flow: a stage that reads a changed "
                                      "one differs too, so the change is in the first stage listed)"])


def recorded(stored: dict, current: dict, every_stage: bool = False) -> tuple[dict, list[str]]:
    """The digests to store, and the stages re-recorded: those whose versions have no stored digest (or every
    stage); other stages keep their stored digests and gain only the files the digest run newly covers."""
    bumped = [stage for stage, entry in current.items()
              if every_stage or stored.get(stage, {}).get("version") != entry["version"]]
    out = {**stored, **{stage: current[stage] for stage in bumped}}
    for stage, entry in current.items():
        if stage not in bumped:
            out[stage] = {**entry, "files": {**entry["files"], **stored[stage]["files"]}}
    return out, bumped


if __name__ == "__main__":  # record the bumped stages and newly covered files (--all: every stage)
    import tempfile

    stored = json.loads(STORED.read_text()) if STORED.is_file() else {}
    with tempfile.TemporaryDirectory() as folder:
        current = record(build_digest_run(Path(folder) / "run"))
    digests, bumped = recorded(stored, current, "--all" in sys.argv)
    STORED.write_text(json.dumps(digests, indent=1) + "\n")
    print(f"recorded {', '.join(bumped) or 'no stage'} (and newly covered files) in {STORED}",
          file=sys.stderr)
