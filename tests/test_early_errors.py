"""Mistakes in prepare's inputs, the tokenizer and eval's arguments are reported before torch or transformers
is imported: one line, exit 2, at once."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

PROBE = ("import sys; from ifguide.cli import main; code = main(sys.argv[1:]); print('heavy' if {'torch', "
         "'transformers', 'datasets'} & set(sys.modules) else 'light'); sys.exit(code)")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def prepare_config(tmp_path, name: str, **data) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": "quick", "data": data}))
    return str(path)


def cases(tmp_path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-eos").mkdir()
    (tmp_path / "no-eos" / "tokenizer.json").write_text("{}")
    (tmp_path / "no-eos" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (tmp_path / "garbage.json").write_text("not a tokenizer")
    corpus = [{"path": str(tmp_path / "nothing" / "*.jsonl"), "source": "mine"}]
    folder = [{"path": str(tmp_path / "folder"), "source": "mine"}]
    settings = {"glob matching nothing": ({"corpus": corpus}, "no file matches"),
                "folder as corpus": ({"corpus": folder}, "is a folder"),
                "folder without a tokenizer": ({"tokenizer": str(tmp_path / "no-tokenizer")},
                                               "not a Hugging Face tokenizer directory"),
                "tokenizer without end-of-text": ({"tokenizer": str(tmp_path / "no-eos")},
                                                  "no end-of-text token"),
                "garbage tokenizer.json": ({"tokenizer": str(tmp_path / "garbage.json")},
                                           "not a readable tokenizer.json")}
    return {case: (["prepare", "--run", str(tmp_path / "run"), "--config",
                    prepare_config(tmp_path, f"c{k}", **data)], message)
            for k, (case, (data, message)) in enumerate(settings.items())}


@pytest.mark.parametrize("case", ["glob matching nothing", "folder as corpus", "folder without a tokenizer",
                                  "tokenizer without end-of-text", "garbage tokenizer.json"])
def test_prepare_mistakes_fail_before_heavy_imports(tmp_path, case):
    argv, message = cases(tmp_path)[case]
    code, out, err = run_cli(argv)
    assert code == 2 and message in err and err.count("\n") == 0, err
    assert out == "light"


@pytest.mark.parametrize("extra,message", [
    (["--scorer", "hf:/nowhere/classifier"], "is not a Hugging Face classifier directory"),
    (["--prompts", "lambada", "--decoding", "rad"], "LAMBADA accuracy is a property of the model"),
])
def test_eval_mistakes_fail_before_heavy_imports(quick_run, extra, message):
    code, out, err = run_cli(["eval", "--run", str(quick_run.root), "--model", "baseline", *extra])
    assert code == 2 and message in err and err.count("\n") == 0, err
    assert out == "light"


def test_queries_and_span_file_mistakes_fail_before_heavy_imports(quick_run, tmp_path):
    from ifguide.cli import main
    from tests.helpers import copied

    run = copied(quick_run, tmp_path)
    r = ["--run", str(run.root)]
    code, out, err = run_cli(["queries", *r, "--model", "baseline", "--name", "q", "--prompts", "rtp"])
    assert code == 2 and "is an evaluation prompt set" in err and out == "light", err
    assert main(["select", *r, "--method", "blocklist-tokens", "--name", "words"]) == 0
    taken = tmp_path / "taken.jsonl"
    taken.write_text("mine\n")
    code, out, err = run_cli(["export-mask", *r, "--mask", "words", "--out", str(taken)])
    assert code == 2 and "exists; pass --force" in err and out == "light", err
    assert taken.read_text() == "mine\n"


def test_a_second_builder_is_refused_before_any_set_up(quick_run, tmp_path):
    from ifguide.artifacts import stage_lock
    from tests.helpers import copied

    run = copied(quick_run, tmp_path)
    run.queries("busy").parent.mkdir()
    with stage_lock(run.queries("busy")):  # another process is building this query set
        code, out, err = run_cli(["queries", "--run", str(run.root), "--model", "baseline", "--name", "busy"])
    assert code == 2 and "is already being built (pid" in err and out == "light", err
    assert not run.queries("busy").exists()


def test_an_unknown_sentence_scorer_fails_before_heavy_imports(quick_run, tmp_path):
    from tests.helpers import copied

    run = copied(quick_run, tmp_path)
    config = yaml.safe_load(run.config_path.read_text())
    config["select"]["sentence_scorer"] = "no-such-scorer"
    run.config_path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(["select", "--run", str(run.root), "--method", "sentence-labels", "--name", "s"])
    assert code == 2 and "unknown scorer 'no-such-scorer'" in err and out == "light", err
    assert not run.mask("s").exists()


def test_a_flag_typo_names_the_subcommand_and_the_closest_flag():
    code, out, err = run_cli(["select", "--run", "r", "--methd", "paper"])
    assert code == 2 and out == "", err
    assert err.startswith("usage: ifguide select") and err.endswith(
        "ifguide select: error: unrecognized argument --methd; did you mean --method?")


def test_queries_refuse_a_labeller_or_settings_before_loading_a_model(quick_run, tmp_path):
    """A labeller that cannot load, a reward model not yet trained, or other settings for a built query set:
    one line, before any model (or torch) is loaded."""
    import importlib.util

    from ifguide.cli import main
    from tests.helpers import copied

    run = copied(quick_run, tmp_path)
    shutil.rmtree(run.reward(), ignore_errors=True)  # another test of the shared run may have trained one
    r = ["queries", "--run", str(run.root), "--model", "baseline"]
    cases = [(["--labeller", f"hf:{tmp_path / 'missing'}"], "is not a Hugging Face classifier directory"),
             (["--labeller", "reward-model"], "run `ifguide reward` first")]
    if importlib.util.find_spec("detoxify") is None:
        cases.append((["--labeller", "detoxify"], "needs `pip install detoxify`"))
    for extra, message in cases:
        code, out, err = run_cli([*r, "--name", "q", *extra])
        assert code == 2 and message in err and err.count("\n") == 0 and out == "light", err
    assert main([*r, "--name", "built", "--max-prompts", "8"]) == 0
    # a built set's changed settings: the set-aside prompts are read with pyarrow alone, and no model
    code, out, err = run_cli([*r, "--name", "built", "--max-prompts", "8", "--samples", "2"])
    assert code == 2 and "rerun with --force" in err and err.count("\n") == 0 and out == "light", err
