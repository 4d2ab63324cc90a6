"""What ifguide refuses: every user mistake gives one line and exit 2, loses no artifact, reuses nothing
stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from ifguide.artifacts import Run, Stage, finished, read_info, remove_stale_temporaries, stage_lock
from ifguide.cli import main
from ifguide.config import config_to_dict, load_config
from ifguide.errors import IfguideError
from tests.helpers import copied, one_line_error


@pytest.fixture
def config_run(tmp_path) -> Run:
    """A run holding only the quick preset's config.yaml and two finished models."""
    run = Run(tmp_path / "run")
    run.save_config(load_config("quick"))
    for name in ("keep-a", "keep-b"):
        (run.model(name)).mkdir(parents=True)
        (run.model(name) / "weights").write_text(name)
    return run


@pytest.mark.parametrize("argv", [
    ["train", "--name", ""], ["train", "--name", "."], ["train", "--name", ".."], ["train", "--name", "a/b"],
    ["select", "--name", ".", "--method", "blocklist-tokens"], ["scores", "--model", "m", "--name", "."],
    ["factors", "--model", ""], ["eval", "--model", "../models"],
])
def test_no_name_can_reach_outside_its_folder(config_run, capsys, argv):
    err = one_line_error(capsys, argv[:1] + ["--run", str(config_run.root)] + argv[1:])
    assert "not a valid artifact name" in err
    assert sorted(p.name for p in (config_run.root / "models").iterdir()) == ["keep-a", "keep-b"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--name", "x", "--lam", "-1"], "train.lam"),
    (["train", "--name", "x", "--seed", "-1"], "seed must be"),
    (["train", "--name", "x", "--epochs", "0"], "train.epochs"),
    (["select", "--scores", "m/s", "--budget", "inf"], "select.budget"),
    (["select", "--scores", "m/s", "--budget", "nan"], "select.budget"),
    (["select", "--scores", "m/s", "--quantile", "1"], "select.quantile"),
    (["select", "--scores", "m/s", "--budget", "1.5"], "whole token count"),
    (["sweep", "--budgets", "0.02", "1.5"], "whole token count"),
])
def test_command_line_values_pass_the_config_validator(config_run, capsys, argv, message):
    assert message in one_line_error(capsys, argv[:1] + ["--run", str(config_run.root)] + argv[1:])


def test_base_cycles_relative_bases_and_numeric_strings(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(IfguideError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "sub").mkdir()
    # YAML reads 1e-3 as a string
    (tmp_path / "sub" / "parent.yaml").write_text("base: quick\ntrain: {lr: 1e-3}\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: parent.yaml\nseed: 3\n")
    # resolved beside child.yaml, not the working directory
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
    assert cfg.train.lr == 0.001 and cfg.seed == 3


def test_a_failed_prepare_leaves_the_recorded_config_alone(config_run, tmp_path, capsys):
    before = config_run.config_path.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: quick\ndata: {sources: {no_such_source: 0}}\n")
    assert "unknown data source" in one_line_error(
        capsys, ["prepare", "--config", str(bad), "--run", str(config_run.root), "--force"])
    assert config_run.config_path.read_text() == before


def test_a_hand_edited_data_section_is_refused(config_run):
    cfg = load_config("quick")
    with Stage(config_run.data(), "prepare", {"seed": cfg.seed, "data": config_to_dict(cfg.data)},
               {}).build():
        pass
    edited = yaml.safe_load(config_run.config_path.read_text())
    edited["data"]["block_size"] = 32
    config_run.config_path.write_text(yaml.safe_dump(edited))
    with pytest.raises(IfguideError, match="data.block_size"):
        config_run.load_config()


def test_corrupt_info_empty_config_and_run_as_file(tmp_path, capsys):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "info.json").write_text("{not json")
    with pytest.raises(IfguideError, match="corrupt"):
        read_info(tmp_path / "art")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("")
    assert "empty" in one_line_error(capsys, ["report", "--run", str(tmp_path / "empty")])
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(capsys, ["report", "--run", str(tmp_path / "file")])


def test_temporaries_are_never_shown_and_stale_ones_are_cleaned(tmp_path):
    masks = tmp_path / "masks"
    dead = masks / ".m.building-999999999-abc"
    alive = masks / f".m.building-{os.getpid()}-abc"
    for folder in (dead, alive, masks / "m"):
        folder.mkdir(parents=True)
        (folder / "inspect.html").write_text("")
    assert finished(tmp_path.glob("masks/*/inspect.html")) == [masks / "m" / "inspect.html"]
    remove_stale_temporaries(masks / "m")
    assert not dead.exists() and alive.exists()


def test_a_second_builder_of_the_same_artifact_is_refused(tmp_path):
    stage = Stage(tmp_path / "scores", "scores", {}, {})
    with stage_lock(tmp_path / "scores"):
        with pytest.raises(IfguideError, match=f"already being built \\(pid {os.getpid()}"), stage.build():
            pass
    with stage.build() as out:  # the lock is released
        (out / "x").write_text("")
    assert (tmp_path / "scores" / "x").is_file()


def test_artifacts_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with Stage(tmp_path / "a", "select", {}, {}).build() as out:
            (out / "factors").mkdir(mode=0o700)
            (out / "factors" / "f.safetensors").touch(mode=0o600)  # as Kronfluence writes its factor files
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "info.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a" / "factors").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "factors" / "f.safetensors").stat().st_mode & 0o777 == 0o644


def test_scoring_read_only_blocks_and_plotting_one_row_are_silent(tmp_path):
    import numpy as np

    from ifguide.evaluation.results import _plot
    from ifguide.influence.token_scores import score_blocks

    np.save(tmp_path / "blocks.npy", np.arange(24, dtype=np.int32).reshape(6, 4))
    blocks = np.load(tmp_path / "blocks.npy", mmap_mode="r")  # read-only, as the run's blocks are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shards = list(score_blocks(lambda ids: ids.float() * 2, blocks, 4, 2))
        _plot({"rad": {"all": {"emt": {"value": 0.3, "ci": [0.2, 0.4]}}, "perplexity": None}},
              tmp_path / "plot.png", "s")
    assert [first for first, _ in shards] == [0, 4]
    assert np.array_equal(np.concatenate([v for _, v in shards]), 2 * np.asarray(blocks, dtype=np.float32))


def test_prompt_file_mistakes(quick_run, tmp_path, capsys):
    from ifguide.data.prompts import load_prompts

    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(IfguideError, match="not UTF-8"):
        load_prompts(quick_run, str(tmp_path / "latin1.jsonl"))
    (tmp_path / "empty.jsonl").write_text('{"prompt": ""}\n')
    with pytest.raises(IfguideError, match="empty"):
        load_prompts(quick_run, str(tmp_path / "empty.jsonl"))
    (tmp_path / "rtp.jsonl").write_text('{"prompt": "Hello", "toxic": null}\n')
    name, rows = load_prompts(quick_run, str(tmp_path / "rtp.jsonl"))
    assert name.startswith("rtp-") and name != "rtp" and rows == [{"prompt": "Hello", "toxic": None}]


def test_a_second_scorer_adds_to_an_evaluation(quick_run):
    from ifguide.evaluation.stage import evaluate

    cfg = quick_run.load_config()
    path = evaluate(cfg, quick_run, "baseline", prompts="rtp", scorers=["profanity-check"])
    first = [json.loads(line)["continuation"]
             for line in (path / "generations.jsonl").read_text().splitlines()]
    evaluate(cfg, quick_run, "baseline", prompts="rtp", scorers=["jigsaw-lstm"])
    results = json.loads((path / "results.json").read_text())
    lines = [json.loads(line) for line in (path / "generations.jsonl").read_text().splitlines()]
    assert set(results["scorers"]) == {"profanity-check", "jigsaw-lstm"}
    assert [r["continuation"] for r in lines] == first and all(len(r["scores"]) == 2 for r in lines)
    with pytest.raises(IfguideError, match="unknown scorer"):
        evaluate(cfg, quick_run, "baseline", prompts="rtp", scorers=["profanity-chek"])


def test_an_empty_mask_is_refused(quick_run):
    from ifguide.selection.stage import select

    with pytest.raises(IfguideError, match="mask would be empty"):  # 2 tokens: no window of 3 fits
        select(quick_run.load_config(), quick_run, None, name="tiny", method="blocklist-tokens", budget=2)


@pytest.mark.parametrize("flags", [["--lam", "2"], ["--objective", "unlikelihood"], ["--lam", "0"]])
def test_penalty_flags_without_a_mask_are_refused(quick_run, capsys, flags):
    from ifguide.cli import main

    assert main(["train", "--run", str(quick_run.root), "--name", "plain", *flags]) == 2
    assert f"{flags[0]} acts only on a mask's tokens" in capsys.readouterr().err
    assert not quick_run.model("plain").exists()


@pytest.mark.parametrize("objective", ["drop", "mask", "conditional"])
def test_lambda_for_an_objective_it_does_not_weigh_is_refused(quick_run, capsys, objective):
    from ifguide.cli import main

    argv = ["train", "--run", str(quick_run.root), "--name", "weighed", "--mask", "any",
            "--objective", objective]
    assert main([*argv, "--lam", "2"]) == 2
    assert f"objective {objective} has no lambda; remove --lam" in capsys.readouterr().err
    assert not quick_run.model("weighed").exists()
    assert main(argv) == 2  # without --lam, the next check speaks: the mask does not exist
    assert "has no lambda" not in capsys.readouterr().err


def test_a_deleted_run_tokenizer_is_named(quick_run, tmp_path):
    from ifguide.data.tokenizer import load_tokenizer

    with pytest.raises(IfguideError, match="tokenizer is missing"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["train", "--name", "x", "--lam", "-1"], "lam"),
    (["eval", "--model", "keep-a", "--scorer", "nope"], "unknown scorer 'nope'"),
    (["eval", "--model", "keep-a", "--prompts", "missing.jsonl"], "prompts 'missing.jsonl' not found"),
    (["eval", "--model", "keep-a", "--prompts", "LATIN1"], "is not UTF-8 text"),
    (["eval", "--model", "nobody"], "models/nobody is missing"),
    (["factors", "--model", "nobody"], "models/nobody is missing"),
    (["train", "--name", "x", "--init", "/nope"], "--init /nope is neither"),
    (["dpo", "--name", "x", "--init", "/nope"], "--init /nope is neither"),
    (["train", "--name", "x", "--mask", "nomask"], "masks/nomask is missing"),
    (["prepare", "--config", "BADTOK"], "data.tokenizer '/no/tokenizer.json' is neither"),
])
def test_argument_errors_come_before_heavy_imports(config_run, tmp_path, argv, message):
    """Names, paths and files are checked before torch, transformers or datasets is imported."""
    with Stage(config_run.model("keep-a"), "train", {}, {}).build():
        pass
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    bad_tokenizer = {**config_to_dict(load_config("quick"))}
    bad_tokenizer["data"]["tokenizer"] = "/no/tokenizer.json"
    (tmp_path / "badtok.yaml").write_text(yaml.safe_dump(bad_tokenizer))
    argv = [{"LATIN1": str(tmp_path / "latin1.jsonl"), "BADTOK": str(tmp_path / "badtok.yaml")}.get(a, a)
            for a in argv]
    run = str(config_run.root) if argv[0] != "prepare" else str(tmp_path / "fresh")
    code = ("import sys; from ifguide.cli import main; "
            f"rc = main({[argv[0], '--run', run, *argv[1:]]!r}); "
            "print(rc, *(m in sys.modules for m in ('torch', 'transformers', 'datasets')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "False", "False", "False"], result.stderr
    assert message in result.stderr


def test_report_compares_only_current_evaluations_of_the_same_prompts_and_scorer(tmp_path):
    from ifguide.evaluation.tables import comparable_evaluations

    run = Run(tmp_path / "run")

    def artifact(path, inputs, payload=None):
        with Stage(path, "eval", {}, inputs).build() as out:
            if payload is not None:
                (out / "results.json").write_text(json.dumps(payload))
        return read_info(path)["fingerprint"]

    models = {name: artifact(run.model(name), {"seed": name})
              for name in ("a-s0", "a-s1", "b-s0", "c-s0", "d-s0")}
    for name, prompts, scorers in [("a-s0", "p1", ["s"]), ("a-s1", "p1", ["s"]), ("b-s0", "p2", ["s"]),
                                   ("c-s0", "p1", ["other"]), ("d-s0", "p1", ["s"])]:
        artifact(run.eval(name, "rtp"), {"model": models[name], "prompts": prompts},
                 {"scorers": dict.fromkeys(scorers)})
    artifact(run.model("d-s0"), {"seed": "retrained"})  # d's evaluation is now stale
    by_method, left_out = comparable_evaluations(run, "rtp", "s")
    assert {m: [d.parent.name for d in dirs] for m, dirs in by_method.items()} == {"a": ["a-s0", "a-s1"]}
    assert [line.split(":")[0] for line in left_out] == ["d-s0", "b-s0", "c-s0"]


def test_an_edited_mirror_tokenizer_is_refused(tmp_path, monkeypatch, data_mirror):
    from ifguide.config import with_overrides
    from ifguide.data.tokenizer import make_tokenizer

    mirror = tmp_path / "mirror"
    target = mirror / "tokenizers" / "neox-20b" / "tokenizer.json"
    target.parent.mkdir(parents=True)
    target.write_bytes((data_mirror / "tokenizers" / "neox-20b" / "tokenizer.json").read_bytes()[:-100])
    monkeypatch.setenv("IFGUIDE_DATA", str(mirror))
    cfg = with_overrides(load_config("quick"), "data", tokenizer=str(target))
    with pytest.raises(IfguideError, match="corrupted"):
        make_tokenizer(cfg, [], tmp_path / "tok")


def test_span_file_outputs_stay_outside_the_run_and_leave_no_temporary(quick_run, tmp_path, capsys):
    from ifguide.artifacts import write_text

    quick_run = copied(quick_run, tmp_path / "copy")
    r = ["--run", str(quick_run.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words-out"]) == 0
    own = quick_run.mask("words-out") / "marked.npz"
    before = own.read_bytes()
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "is a folder" in one_line_error(capsys, ["export-mask", *r, "--mask", "words-out", "--out",
                                                    str(folder)])
    assert list(folder.iterdir()) == [] and list(tmp_path.glob(".folder*")) == []
    err = one_line_error(capsys, ["export-mask", *r, "--mask", "words-out", "--out", str(own), "--force"])
    assert "inside the run" in err and own.read_bytes() == before
    with pytest.raises(IsADirectoryError):  # the shared writer cleans up after any failure
        write_text(folder, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "folder"]


def test_sweep_lists_are_deduplicated_and_an_imported_mask_is_named(quick_run, tmp_path, capsys):
    cfg = config_to_dict(load_config("quick"))
    cfg["sweep"]["lams"] = [1.0, 1.0]
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(IfguideError, match="must not repeat a value"):
        load_config(str(tmp_path / "dup.yaml"))
    quick_run = copied(quick_run, tmp_path / "copy")
    r = ["--run", str(quick_run.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words-sweep"]) == 0
    assert main(["export-mask", *r, "--mask", "words-sweep", "--out", str(tmp_path / "w.jsonl")]) == 0
    assert main(["import-mask", *r, "--spans", str(tmp_path / "w.jsonl"), "--name", "words-imported"]) == 0
    err = one_line_error(capsys, ["sweep", *r, "--masks", "words-imported", "words-imported"])
    assert "'words-imported' was not selected by `ifguide select" in err


def test_a_corpus_symlink_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    cfg = config_to_dict(load_config("quick"))
    cfg["data"].update(sources={}, corpus=[{"path": str(tmp_path / "*.jsonl"), "source": "mine"}])
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump(cfg))
    err = one_line_error(capsys, ["prepare", "--config", str(tmp_path / "loop.yaml"), "--run",
                                  str(tmp_path / "r")])
    assert "symlink loop" in err
