"""Config loading: presets, inheritance, and one-line errors naming the bad key."""

import argparse

import pytest

from ifguide.cli import main
from ifguide.config import PRESETS, load_config
from ifguide.errors import IfguideError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.select.quantile == 0.99 and cfg.train.lam == 1.0


def test_paper_preset_matches_the_paper():
    cfg = load_config("pythia-160m-owt")
    settings = (cfg.data.block_size, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    assert settings == (2048, 6e-4, [0.9, 0.95], 4e-4)
    assert cfg.train.batch_size * cfg.train.grad_accum == 256 and cfg.train.warmup_ratio == 0.01


def test_yaml_file_extends_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: quick\ntrain:\n  lr: 0.01\n  weight_decay: 1e-3\n")  # YAML 1.1: 1e-3 is a string
    cfg = load_config(str(path))
    assert cfg.train.lr == 0.01 and cfg.data.block_size == load_config("quick").data.block_size
    assert cfg.train.weight_decay == 0.001


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr'"),
    ("train:\n  lr: fast\n", "'train.lr' must be a number"),
    ("train:\n  lam: \"1\"\n", "'train.lam' must be a number"),
    ("select:\n  quantile: 1.5\n", "select.quantile must be in"),
    ("influence:\n  last_layers: 0\n", "influence.last_layers must be >= 1"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("train: [1, 2\n", "not valid YAML"),
    ("train:\n  lr: [1, 2\n  wd: 3\n", "at line 3"),
    ("data:\n  num_toxic_queries: -1\n", "num_toxic_queries"),
    ("train:\n  batch_size: 0\n", "train.batch_size and train.grad_accum must be >= 1"),
    ("influence:\n  shard_blocks: 0\n", "shard_blocks"),
    ("", "is empty"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(IfguideError, match=message):
        load_config(str(path))
    assert main(["prepare", "--config", str(path), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message.split("'")[0] in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_every_cli_flag_has_help_and_every_command_an_example_that_parses():
    from ifguide.cli import EXAMPLES, _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(EXAMPLES)
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
        assert command.epilog == f"example: {EXAMPLES[name]}"
        words = EXAMPLES[name].split()
        assert words[:2] == ["ifguide", name] and parser.parse_args(words[1:]).command == name
    assert "runs/demo" in commands["demo"].description


def test_enumerated_settings_are_declared_once_and_checked_by_name():
    from typing import get_args

    from ifguide.cli import _parser
    from ifguide.config import with_overrides
    from ifguide.names import TokenScores

    cfg = load_config("quick")
    with pytest.raises(IfguideError,
                       match="'influence.token_scores' must be one of loss-term, kronfluence, got 'x'"):
        with_overrides(cfg, "influence", token_scores="x")
    scores = next(a for a in _parser()._subparsers._group_actions[0].choices["scores"]._actions
                  if a.dest == "token_scores")
    assert tuple(scores.choices) == get_args(TokenScores)
    # a section checks its own fields
    with pytest.raises(IfguideError, match="influence.normalize: relative needs"):
        with_overrides(cfg, "influence", normalize="relative", token_scores="kronfluence")
