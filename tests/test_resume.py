"""Resumable training: a `kill -9` mid-training, then a rerun, gives the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ifguide.cli import main
from ifguide.training.stage import last_checkpoint

from .test_reliability import copied


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_weights(quick_run, tmp_path, capsys):
    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["train"]["checkpoint_every"] = 50  # not part of the recipe: the model stays the one of this config
    run.config_path.write_text(yaml.safe_dump(config))
    r = ["--run", str(run.root)]
    assert main(["train", *r, "--name", "whole", "--seed", "0"]) == 0
    assert not (run.root / "models" / ".whole.checkpoints").exists()  # removed once the model is complete

    checkpoints = run.root / "models" / ".cut.checkpoints"
    code = "import sys; from ifguide.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "train", *r, "--name", "cut", "--seed", "0"],
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
    assert main(["train", *r, "--name", "cut", "--seed", "0"]) == 0
    assert f"train cut: resuming from step {step}" in capsys.readouterr().out
    whole = load_file(run.model("whole") / "model.safetensors")
    cut = load_file(run.model("cut") / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not checkpoints.exists()
