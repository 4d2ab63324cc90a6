"""Resumable training: a `kill -9` mid-training, then a rerun, gives the weights and info.json of an
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ifguide.artifacts import RESUME, Journal, Stage
from ifguide.cli import main
from ifguide.training.stage import last_checkpoint
from tests.helpers import copied, is_wall_time


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_weights(quick_run, tmp_path, capsys):
    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["train"]["checkpoint_every"] = 50  # not part of the recipe: the model stays the one of this config
    run.config_path.write_text(yaml.safe_dump(config))
    r = ["--run", str(run.root)]
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    masked = ["--seed", "0", "--mask", "words", "--objective", "unlikelihood"]
    assert main(["train", *r, "--name", "whole", *masked]) == 0
    assert not (run.root / "models" / ".whole.partial").exists()  # removed once the model is complete

    checkpoints = run.root / "models" / ".cut.partial" / "resume" / "checkpoints"
    code = "import sys; from ifguide.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "train", *r, "--name", "cut", *masked],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    while process.poll() is None:
        latest = last_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if latest is not None and int(latest.name.split("-")[-1]) >= 100:
            process.send_signal(signal.SIGKILL)  # kill -9: no handler, no clean-up
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "training ended before a checkpoint at step >= 100"
    assert not (run.model("cut") / "model.safetensors").exists()
    step = last_checkpoint(checkpoints).name.split("-")[-1]
    capsys.readouterr()
    assert main(["train", *r, "--name", "cut", *masked]) == 0
    assert f"train cut: resuming from step {step}" in capsys.readouterr().out
    infos = [json.loads((run.model(name) / "info.json").read_text()) for name in ("whole", "cut")]
    wall = ("train_runtime_s", "tokens_per_s", "fingerprint")
    assert infos[1]["train_runtime_s"] > 0
    assert [{k: v for k, v in info.items() if k not in wall} for info in infos][0] == \
        {k: v for k, v in infos[1].items() if k not in wall}
    logs = [json.loads((run.model(name) / "train_log.json").read_text()) for name in ("whole", "cut")]
    assert [e for e in logs[0] if "loss" in e] == [e for e in logs[1] if "loss" in e]
    assert logs[1][-1]["suppressed_tokens"] == logs[0][-1]["suppressed_tokens"] > 0
    whole = load_file(run.model("whole") / "model.safetensors")
    cut = load_file(run.model("cut") / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not checkpoints.exists()


def test_a_journal_drops_the_line_a_kill_cut_short(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.record("0", [["a", "b"]])
    journal.record("1", {"file": "x"})
    path.write_bytes(path.read_bytes() + b'["2", [["c"')  # killed while writing unit 2
    again = Journal(path)
    assert again.done == {"0": [["a", "b"]], "1": {"file": "x"}}
    again.record("2", [])
    assert Journal(path).done == {"0": [["a", "b"]], "1": {"file": "x"}, "2": []}


def test_a_resumable_build_keeps_its_work_only_for_the_same_recipe(tmp_path):
    def interrupted(stage: Stage) -> None:
        with pytest.raises(KeyboardInterrupt), stage.build(resumable=True) as out:
            (out / RESUME / "work").write_text(stage.config["n"])
            raise KeyboardInterrupt

    first = Stage(tmp_path / "m", "select", {"n": "1"}, {})
    interrupted(first)
    assert (first.partial / RESUME / "work").read_text() == "1" and not first.path.exists()
    with first.build(resumable=True) as out:
        assert (out / RESUME / "work").read_text() == "1"  # the same recipe continues from its work
    assert not first.partial.exists() and not (first.path / RESUME).exists()  # published without it
    interrupted(first)
    other = Stage(tmp_path / "m", "select", {"n": "2"}, {})
    with other.build(resumable=True) as out:
        assert not (out / RESUME / "work").exists()  # another recipe starts afresh
    interrupted(first)
    with first.build(resumable=True, force=True) as out:
        assert not (out / RESUME / "work").exists()  # and so does --force


@pytest.mark.slow
def test_interrupted_queries_eval_and_scores_resume_at_their_next_batch_or_shard(quick_run, tmp_path,
    monkeypatch):
    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["influence"]["shard_blocks"] = 256
    config["eval"]["prompt_batch_size"] = config["queries"]["prompt_batch_size"] = 4  # 20 prompts: 5 batches
    run.config_path.write_text(yaml.safe_dump(config))
    r = ["--run", str(run.root)]
    assert main(["factors", *r, "--model", "baseline"]) == 0
    record = Journal.record

    def recording(limit: int | None = None) -> list[str]:
        keys = []

        def record_or_stop(self, key, value):
            if len(keys) == limit:
                raise KeyboardInterrupt
            keys.append(key)
            record(self, key, value)

        monkeypatch.setattr(Journal, "record", record_or_stop)
        return keys

    for argv, outputs in ((["queries", *r, "--model", "baseline", "--name", "self", "--max-prompts", "40"],
                           lambda: [run.queries("self")]),
                          (["eval", *r, "--model", "baseline"], lambda: [run.eval("baseline", "rtp")]),
                          (["scores", *r, "--model", "baseline"],
                           lambda: list(run.root.glob("influence/*/scores/*")))):
        first = recording(limit=2)
        assert main(argv) == 130  # interrupted after two units
        rest = recording()
        assert main(argv) == 0
        monkeypatch.undo()
        assert rest and not set(first) & set(rest)  # the rerun did only the units left
        [folder] = outputs()
        resumed = outputs_of(folder)
        assert main([*argv, "--force"]) == 0  # from scratch
        fresh = outputs_of(folder)
        assert resumed and resumed == fresh
        assert not any(folder.parent.glob(".*.partial"))


def outputs_of(folder):
    """The samples, generations and score shards of an artifact, byte for byte, and its JSON files but for
    wall times."""
    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if not is_wall_time(k)}  # totals over attempts
        return [timeless(v) for v in value] if isinstance(value, list) else value

    return {f.name: f.read_bytes() if f.suffix != ".json" else timeless(json.loads(f.read_text()))
            for f in folder.iterdir() if f.suffix in (".npy", ".jsonl", ".json")}


@pytest.mark.parametrize("every,expected", [(4, "rerun the same command to resume from step 8"),
                                            (0, "no checkpoint yet; a rerun starts over")])
def test_ctrl_c_in_train_says_where_a_rerun_starts(quick_run, tmp_path, monkeypatch, capsys, every, expected):
    from transformers import TrainerCallback

    import ifguide.training.stage as stage

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                raise KeyboardInterrupt

    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["train"]["checkpoint_every"] = every
    run.config_path.write_text(yaml.safe_dump(config))
    shown = stage.show_progress
    monkeypatch.setattr(stage, "show_progress",
                        lambda trainer, label: shown(trainer, label).add_callback(CtrlC()) or trainer)
    assert main(["train", "--run", str(run.root), "--name", "cut"]) == 130
    assert f"\ntrain cut: interrupted at step 10; {expected}\n" in capsys.readouterr().err
    monkeypatch.setattr(stage, "show_progress", shown)
    assert main(["train", "--run", str(run.root), "--name", "cut"]) == 0
    assert ("resuming from step 8" in capsys.readouterr().out) == bool(every)


def test_checkpoints_come_every_tenth_of_the_steps_and_once_the_time_has_passed(monkeypatch):
    from transformers import TrainerControl, TrainerState

    from ifguide.training.stage import TimedCheckpoints

    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    callback, control = TimedCheckpoints(seconds=120), TrainerControl()
    state = TrainerState(max_steps=400)  # a tenth: 40 steps
    for now, step, saves in ((60, 1, False), (119, 2, False), (121, 3, True), (200, 4, False), (242, 5, True),
                             (243, 40, True), (244, 41, False), (245, 80, True)):
        clock[0], state.global_step, control.should_save = now, step, False
        callback.on_step_end(None, state, control)
        assert control.should_save == saves, (now, step)
