"""Scale-out: scores split over processes (`scores --shard I/N`) and training under torchrun, each checked
against one plain process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from ifguide.data.tokenizer import load_tokenizer
from ifguide.errors import IfguideError
from ifguide.influence import ScoreReader, factors
from ifguide.model import build_model
from ifguide.selection.masks import load_mask
from ifguide.selection.stage import select


def ifguide(*args: str, launcher: tuple[str, ...] = (), scratch: Path | None = None) -> subprocess.Popen:
    """The ifguide command line in a new process (optionally under a launcher such as torchrun, whose
    temporary folders go to `scratch`, so that a killed group leaves none in the system's)."""
    command = [sys.executable, *launcher, "-m", "ifguide.cli", *args] if not launcher else \
        [sys.executable, *launcher, "--", sys.executable, "-m", "ifguide.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=process_env(scratch))


def process_env(scratch: Path | None) -> dict[str, str]:
    scratch_env = {"TMPDIR": str(scratch)} if scratch else {}
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", **scratch_env}


def finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_scores_in_two_processes_equal_one_process(quick_run):
    cfg = quick_run.load_config()  # ~3,000 blocks in shards of 1,024: part 0 scores one shard, part 1 two
    factors(cfg, quick_run, "baseline")
    # every side in its own process: the reference must not inherit torch state from earlier tests
    finish(ifguide("scores", "--run", str(quick_run.root), "--model", "baseline", "--name", "whole",
                   "--queries", "rtp"))
    whole = quick_run.scores("baseline", "whole")
    parts = [ifguide("scores", "--run", str(quick_run.root), "--model", "baseline", "--name", "split",
                     "--shard",
                     f"{i}/2", "--queries", "rtp") for i in range(2)]  # side by side, as on two GPUs
    for proc in parts:
        finish(proc)
    one, two = ScoreReader(whole), ScoreReader(quick_run.scores("baseline", "split"))
    assert two.info["parts"] == 2 and len(two.shards) == len(one.shards) > 2
    assert two.info["fingerprint"] == one.info["fingerprint"]
    for a, b in zip(one.shards, two.shards):  # the same files, byte for byte
        assert a["start"] == b["start"] and b["file"].startswith("parts/")
        assert (whole / a["file"]).read_bytes() == (two.path / b["file"]).read_bytes()
    assert np.array_equal(one.blocks(0, one.shape[0]), two.blocks(0, two.shape[0]))
    select(cfg, quick_run, "baseline/whole", name="from-whole")
    select(cfg, quick_run, "baseline/split", name="from-parts")
    assert np.array_equal(load_mask(quick_run.mask("from-whole")), load_mask(quick_run.mask("from-parts")))
    missing = quick_run.scores("baseline", "split") / "parts" / "1-of-2"
    missing.rename(missing.with_name("gone"))
    with pytest.raises(IfguideError, match=r"part\(s\) 1/2 missing"):
        ScoreReader(quick_run.scores("baseline", "split"))


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_training_in_two_processes_equals_one_process(quick_run, masked, tmp_path):
    """torchrun, 2 CPU processes (gloo), per-process batch 8 = one process with batch 16."""
    cfg = quick_run.load_config()
    extra = []
    if masked:
        select(cfg, quick_run, None, name="bl", method="blocklist-tokens")
        extra = ["--mask", "bl"]
    tag = "masked" if masked else "plain"
    common = ["train", "--run", str(quick_run.root), "--epochs", "0.1", *extra]
    single = ifguide(*common, "--name", f"one-{tag}")
    finish(single)
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python")
    out = finish(ifguide(*common, "--name", f"two-{tag}", launcher=launcher, scratch=tmp_path))
    assert "2 processes" in out
    one = load_file(quick_run.model(f"one-{tag}") / "model.safetensors")
    two = load_file(quick_run.model(f"two-{tag}") / "model.safetensors")
    tok = load_tokenizer(quick_run.data())
    start = build_model(cfg.model, len(tok), cfg.data.block_size, tok.eos_token_id, cfg.seed).state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if k in start)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    # float rounding only (Adam amplifies it on tiny gradients)
    assert moved > 1e-2 and gap < 1e-3, (moved, gap)
    leftovers = [p.name for p in quick_run.model(f"two-{tag}").parent.iterdir()
                 if p.name.startswith(f".two-{tag}")]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_to_an_uninterrupted_run(quick_run, tmp_path):
    """torchrun, 2 CPU processes: the whole group killed (-9) after its first checkpoint, then rerun, gives
    the weights and info.json of an uninterrupted 2-process run (every process waits for rank 0's
    clean-up)."""
    import json
    import signal
    import time

    import psutil  # installed with accelerate, which the Trainer needs
    import yaml

    from ifguide.training.stage import last_checkpoint
    from tests.helpers import copied, is_wall_time

    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["train"]["checkpoint_every"] = 20
    run.config_path.write_text(yaml.safe_dump(config))
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python")
    common = ["train", "--run", str(run.root), "--epochs", "0.5"]
    finish(ifguide(*common, "--name", "whole", launcher=launcher, scratch=tmp_path))
    checkpoints = run.root / "models" / ".cut.partial" / "resume" / "checkpoints"
    command = [sys.executable, *launcher, "--", sys.executable, "-m", "ifguide.cli", *common, "--name", "cut"]
    launched = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=process_env(tmp_path))
    while launched.poll() is None:
        if checkpoints.is_dir() and last_checkpoint(checkpoints) is not None:
            # torchrun starts each process in a session of its own: kill -9 every one, then the launcher
            processes = psutil.Process(launched.pid).children(recursive=True)
            for process in processes:
                process.send_signal(signal.SIGKILL)
            psutil.wait_procs(processes)
            launched.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    launched.wait()
    assert last_checkpoint(checkpoints) is not None, "training ended before its first checkpoint"
    step = last_checkpoint(checkpoints).name.split("-")[-1]
    out = finish(ifguide(*common, "--name", "cut", launcher=launcher, scratch=tmp_path))
    assert f"resuming from step {step}" in out and "2 processes" in out
    whole, cut = (load_file(run.model(name) / "model.safetensors") for name in ("whole", "cut"))
    assert max(float((whole[k] - cut[k]).abs().max()) for k in whole) < 1e-5
    infos = [json.loads((run.model(name) / "info.json").read_text()) for name in ("whole", "cut")]
    assert [{k: v for k, v in i.items() if not is_wall_time(k) and k != "fingerprint"} for i in infos][0] == \
        {k: v for k, v in infos[1].items() if not is_wall_time(k) and k != "fingerprint"}
