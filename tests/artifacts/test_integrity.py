"""Nothing stale, damaged, unpickled or half-built is ever used: one line, exit 2, and nothing else
touched."""

from __future__ import annotations

import errno
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ifguide.artifacts import Run, Stage, load_array, read_info, write_json
from ifguide.cli import main, rebuild_command
from ifguide.config import load_config
from ifguide.errors import IfguideError
from tests.helpers import fake_scores, one_line_error

SRC = Path(__file__).resolve().parents[2] / "src" / "ifguide"


@pytest.fixture
def run_copy(quick_run, tmp_path) -> Run:
    """A private copy of the prepared and trained quick run, free to damage."""
    shutil.copytree(quick_run.root, tmp_path / "run")
    return Run(tmp_path / "run")


def select_argv(run: Run, name: str = "m") -> list[str]:
    return ["select", "--run", str(run.root), "--scores", "baseline/s", "--name", name]


def test_rebuild_commands_follow_the_layout():
    assert rebuild_command(Path("r/influence/m/scores/s")) == \
        "ifguide scores --run r --model m --name s --force"
    assert rebuild_command(Path("r/influence/m/scores/s/parts/1-of-2")) == \
        "ifguide scores --run r --model m --name s --shard 1/2 --force"
    assert rebuild_command(Path("/x/r/models/b")) == "ifguide train --run /x/r --name b --force"
    assert rebuild_command(Path("r/eval/b/rtp")) == "ifguide eval --run r --model b --prompts rtp --force"


def test_rebuild_commands_keep_the_settings_the_artifact_recorded(tmp_path):
    """A damaged artifact is rebuilt as what it was (an IF-Guide model with its mask, RTP scores with RTP
    queries), not with the config's defaults under its name."""
    def command(folder: Path, info: dict) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "info.json").write_text(json.dumps(info))
        return rebuild_command(folder).removeprefix("ifguide ").replace(str(tmp_path / "r"), "R")

    model = tmp_path / "r" / "models" / "ifguide-self-matched-s1"
    recipe = {"seed": 1, "lam": 1.0, "data": "full", "mask": "ifguide-self", "init": None,
              "matched_tokens": True}
    assert command(model, {"recipe": {"config": recipe}, "objective": "ascent", "arch": "main"}) == (
        "train --run R --name ifguide-self-matched-s1 --seed 1 --data full --arch main --mask ifguide-self "
        "--lam 1.0 --objective ascent --matched-tokens --force")
    plain = {"seed": 0, "lam": 0.0, "data": "filter", "mask": None, "init": None}
    assert command(model, {"recipe": {"config": plain}, "objective": None}) == (
        "train --run R --name ifguide-self-matched-s1 --seed 0 --data filter --force")
    scores = {"queries": "rtp", "query": "toxic-minus-nontoxic", "token_scores": "loss-term",
              "normalize": "none", "data": "filter", "shard_blocks": 16384}
    assert command(tmp_path / "r" / "influence" / "b" / "scores" / "toxic-minus-nontoxic-head-filter",
                   {"recipe": {"config": scores}}) == (
        "scores --run R --model b --name toxic-minus-nontoxic-head-filter --queries rtp --query "
        "toxic-minus-nontoxic --token-scores loss-term --normalize none --data filter --include-head --force")
    mask = {"budget": 0.01, "method": "paper", "quantile": 0.99, "window": 1}
    scored = "influence/b/scores/toxic-minus-nontoxic"
    assert command(tmp_path / "r" / "masks" / "m", {"recipe": {"config": mask}, "scores": scored}) == (
        "select --run R --name m --method paper --budget 0.01 --quantile 0.99 --window 1 "
        "--scores b/toxic-minus-nontoxic --force")


def test_every_rebuild_command_parses_with_the_cli(tmp_path):
    from ifguide.cli import _REBUILD, _parser

    for pattern, method, _ in _REBUILD:
        names = ["0-of-2" if p == "*" and "parts" in pattern and k == len(pattern) - 1 else "n" if p == "*"
                 else p for k, p in enumerate(pattern)]
        folder = tmp_path.joinpath("r", *names)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"method": method, "init": "baseline", "spans": "s.jsonl", "model": "baseline"}
        (folder / "info.json").write_text(json.dumps(info))
        command = rebuild_command(folder)
        assert command.startswith("ifguide ") and command.endswith(" --force"), (pattern, command)
        _parser().parse_args(shlex.split(command)[1:])  # exits (SystemExit) on a flag the CLI does not have
        assert command.split()[1] == _[:_.index(" ")], (pattern, command)


def test_a_rebuilt_model_makes_everything_downstream_stale(run_copy, capsys):
    fake_scores(run_copy)
    assert main(select_argv(run_copy)) == 0
    info = json.loads((run_copy.model("baseline") / "info.json").read_text())
    # as a retrain does
    write_json(run_copy.model("baseline") / "info.json", {**info, "fingerprint": "retrained"})
    err = one_line_error(capsys, select_argv(run_copy))  # the mask exists: it was "up to date" before
    assert "scores/s is stale: its input" in err and "models/baseline was rebuilt" in err
    assert f"`ifguide scores --run {run_copy.root} --model baseline --name s --force`" in err
    err = one_line_error(capsys, ["train", "--run", str(run_copy.root), "--name", "t", "--mask", "m"])
    assert "scores/s is stale" in err  # two steps back: mask -> scores -> model
    shutil.rmtree(run_copy.model("baseline"))
    assert "models/baseline was removed" in one_line_error(capsys, select_argv(run_copy))


def test_stale_inputs_are_found_however_far_back(tmp_path):
    run = Run(tmp_path / "run")
    chain = [run.data(), run.model("a"), run.scores("a", "s"), run.mask("m"), run.model("b"),
             run.eval("b", "rtp")]
    for i, path in enumerate(chain):
        with Stage(path, "select", {}, {"i": str(i)}, tuple(chain[:i][-1:])).build():
            pass
    run.require(chain[-1], "")
    with Stage(chain[0], "select", {"other": 1}, {}).build():  # the data, five steps back, is rebuilt
        pass
    with pytest.raises(IfguideError,
                       match=re.escape(f"{chain[1]} is stale: its input {chain[0]} was rebuilt")):
        run.require(chain[-1], "")


@pytest.mark.parametrize("damage, what", [
    (lambda f: f.unlink(), "shard_000000000.npy is missing"),
    (lambda f: f.write_bytes(f.read_bytes()[:200]), "truncated"),
    (lambda f: np.save(f, np.zeros((100, 64), np.float64)), "holds float64, not float32"),
    (lambda f: np.save(f, np.zeros((100, 64), object), allow_pickle=True), "holds Python objects"),
    (lambda f: np.save(f, np.zeros((99, 64), np.float32)), "holds (99, 64)"),
])
def test_a_damaged_score_shard_is_one_line(run_copy, capsys, damage, what):
    damage(fake_scores(run_copy) / "shard_000000000.npy")
    err = one_line_error(capsys, select_argv(run_copy))
    assert "is damaged" in err and what in err and "ifguide scores" in err and "--force" in err
    assert not run_copy.mask("m").exists()


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IfguideError, match="holds Python objects"):
        load_array(tmp_path, "x.npy")
    with pytest.raises(IfguideError, match="outside the artifact"):
        load_array(tmp_path / "inner", "../x.npy")


def test_no_code_path_can_unpickle():
    """The package never calls an unrestricted unpickler: run artifacts are npy/npz (allow_pickle off),
    safetensors and JSON; the one Unpickler is the state-only one for tokenizers shipped in installed
    wheels."""
    banned = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|joblib|dill|cloudpickle|"
                        r"weights_only\s*=\s*False")
    hits = [f"{f.relative_to(SRC)}:{i}" for f in SRC.rglob("*.py")
            for i, line in enumerate(f.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []


def test_shard_names_cannot_leave_the_artifact(run_copy, capsys):
    path = fake_scores(run_copy)
    info = json.loads((path / "info.json").read_text())
    info["shards"][0]["file"] = "../../../../../../../../etc/hostname"
    (path / "info.json").write_text(json.dumps(info))
    assert "outside the artifact" in one_line_error(capsys, select_argv(run_copy))


@pytest.mark.parametrize("content, what", [("[1, 2]", "holds a list, not an object"),
                                           ('{"recipe": {}}', "has no fingerprint"),
                                           ("{oops", "is not JSON")])
def test_a_damaged_info_json_is_one_line(run_copy, capsys, content, what):
    (run_copy.model("baseline") / "info.json").write_text(content)
    err = one_line_error(capsys, ["eval", "--run", str(run_copy.root), "--model", "baseline"])
    assert f"models/baseline is damaged (info.json {what})" in err
    assert f"`ifguide train --run {run_copy.root} --name baseline --force`" in err


@pytest.mark.parametrize("argv", [["eval", "--model", "baseline", "--prompts", "PROMPTS"],
                                  ["factors", "--model", "baseline", "--force"],
                                  ["train", "--name", "ft", "--init", "baseline"]])
def test_a_truncated_model_is_one_line(run_copy, tmp_path, capsys, argv):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a prompt no other test evaluates"}\n')  # nothing to reuse
    argv = [str(tmp_path / "p.jsonl") if a == "PROMPTS" else a for a in argv]
    weights = run_copy.model("baseline") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(run_copy.root.rglob("*"))
    err = one_line_error(capsys, [argv[0], "--run", str(run_copy.root), *argv[1:]])
    assert "models/baseline is damaged" in err and "ifguide train" in err
    assert sorted(run_copy.root.rglob("*")) == before  # nothing touched, not even an empty folder


def test_report_refuses_an_evaluation_without_info(tmp_path, capsys):
    run = Run(tmp_path / "run")
    run.save_config(load_config("quick"))
    (run.eval("b", "rtp")).mkdir(parents=True)
    (run.eval("b", "rtp") / "results.json").write_text("{}")
    err = one_line_error(capsys, ["report", "--run", str(run.root)])
    assert "eval/b/rtp is damaged (results.json without info.json)" in err


def test_report_finds_prompt_sets_whose_names_look_like_globs(tmp_path):
    from ifguide.evaluation.tables import comparable_evaluations

    run = Run(tmp_path / "run")
    with Stage(run.model("a-s0"), "select", {}, {}).build():
        pass
    model = read_info(run.model("a-s0"))["fingerprint"]
    for prompts in ("p[1]-abc", "p1-abc"):
        with Stage(run.eval("a-s0", prompts), "select", {}, {"model": model, "prompts": prompts},
                   (run.model("a-s0"),)).build() as out:
            (out / "results.json").write_text(json.dumps({"scorers": {"s": {}}}))
    found, left_out = comparable_evaluations(run, "p[1]-abc", "s")
    assert [d.name for d in found["a"]] == ["p[1]-abc"] and left_out == []


def test_disk_full_is_one_line_and_keeps_the_old_artifact(tmp_path):
    path = tmp_path / "models" / "m"
    with Stage(path, "select", {}, {}).build() as out:
        (out / "weights").write_text("old")
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")):
        with pytest.raises(IfguideError, match=f"disk full at {path.parent} while writing m"):
            with Stage(path, "select", {"new": 1}, {}).build() as out:
                (out / "weights").write_text("half")
                raise error
        assert (path / "weights").read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["m"]


def test_disk_full_during_train_is_one_line(run_copy, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    argv = ["train", "--run", str(run_copy.root), "--name", "big", "--epochs", "0.05"]
    assert "disk full at" in one_line_error(capsys, argv)
    assert not run_copy.model("big").exists()


@pytest.mark.slow
def test_two_reward_processes_never_train_side_by_side(run_copy):
    """The second `ifguide reward` is refused at once, while the first trains, because the lock comes
    first."""
    # another test may have trained one on the shared run
    shutil.rmtree(run_copy.reward(), ignore_errors=True)
    command = [sys.executable, "-m", "ifguide.cli", "reward", "--run", str(run_copy.root)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_copy.root / ".reward.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True)
    out, err = first.communicate()
    assert first.returncode == 0, err
    assert second.returncode == 2 and "already being built" in second.stderr
    assert "training texts" not in second.stdout  # it did no work
    assert "held-out AUC" in out


def test_disk_full_during_prepare_is_one_line(tmp_path, capsys, monkeypatch):
    import pyarrow as pa

    import ifguide.data.stage

    def full(*args, **kwargs):
        raise pa.ArrowIOError("IOError: No space left on device")  # as an Arrow writer reports it

    monkeypatch.setattr(ifguide.data.stage, "read_documents", full)
    err = one_line_error(capsys, ["prepare", "--config", "quick", "--run", str(tmp_path / "run")])
    assert f"disk full at {tmp_path / 'run'}" in err
    assert not (tmp_path / "run").exists()  # no config.yaml, no half-built data, not even the folder


def test_checkpoint_settings_are_named_in_their_errors(run_copy, tmp_path, capsys):
    from ifguide.baselines.dpo import preferences_name

    config = yaml.safe_load(run_copy.config_path.read_text())
    config["model"]["init_from"] = "/nope"
    run_copy.config_path.write_text(yaml.safe_dump(config))
    err = one_line_error(capsys, ["train", "--run", str(run_copy.root), "--name", "x"])
    assert "model.init_from /nope is neither" in err and "--init" not in err
    checkpoint = tmp_path / "my-checkpoint"
    assert preferences_name(run_copy, str(checkpoint), checkpoint,
                            "0123456789abcdef") == "my-checkpoint-01234567"
    assert preferences_name(run_copy, "baseline", run_copy.model("baseline"), "f") == "baseline"


def test_a_bumped_computation_version_refuses_the_old_artifact_and_nothing_else(run_copy, capsys,
    monkeypatch):
    from ifguide.artifacts import COMPUTATION_VERSIONS

    r = ["--run", str(run_copy.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    recipe = read_info(run_copy.mask("words"))["recipe"]
    # no hash of the code: a docstring edit is free
    assert set(recipe) == {"stage", "version", "config", "inputs"}
    capsys.readouterr()
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    assert "is up to date" in capsys.readouterr().out
    # another stage's change
    monkeypatch.setitem(COMPUTATION_VERSIONS, "train", COMPUTATION_VERSIONS["train"] + 1)
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    # Algorithm 1 edited
    monkeypatch.setitem(COMPUTATION_VERSIONS, "select", COMPUTATION_VERSIONS["select"] + 1)
    err = one_line_error(capsys, ["select", *r, "--method", "blocklist-tokens", "--name", "words"])
    assert "masks/words was built from other inputs (version changed); rerun with --force" in err


def test_a_run_recorded_before_a_setting_existed_keeps_its_config(tmp_path):
    from ifguide.artifacts.build import changed_keys

    cfg = load_config("quick")
    run = Run(tmp_path / "run")
    run.root.mkdir()
    run.save_config(cfg)
    recorded = yaml.safe_load(run.config_path.read_text())
    del recorded["influence"]["head_strategy"]  # a setting added after the run was recorded, at its default
    run.config_path.write_text(yaml.safe_dump(recorded))
    run.check_config(cfg)
    recorded["train"]["lam"] = 0.5
    run.config_path.write_text(yaml.safe_dump(recorded))
    with pytest.raises(IfguideError, match=r"holds another config \(train\.lam differ\)"):
        run.check_config(cfg)
    assert changed_keys({"a": {"b": None}}, {"a": {}, "c": 1}) == ["a.b", "c"]
