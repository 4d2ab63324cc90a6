"""Messages that tell the truth: what `sources: {name: 0}` means, what the queries stage cost, how many epochs
the filter row trained."""

from ifguide.data.stage import print_summary
from ifguide.evaluation.results import _epochs_note
from ifguide.queries.stage import query_cost


def summary(**source) -> dict:
    row = {"documents": 40, "tokens": 4000, "token_share": 1.0, "toxic_bearing": False, **source}
    return {"documents": 40, "tokens": 4000, "blocks": 60, "block_size": 64, "toxic_bearing_token_share": 0.0,
            "toxic_labelled_token_share": 0.0, "blocklisted_documents": 0, "blocklisted_token_share": 0.0,
            "empty_documents_skipped": 0, "duplicate_documents_dropped": 0, "partial_records_skipped": 0,
            "heldout": {k: {"documents": 1, "blocks": 1} for k in ("heldout", "heldout_benign",
                                                                   "heldout_blocklisted")},
            "per_source": {"wiki": row}, "toxic_queries": 1, "nontoxic_queries": 1, "prompts": {},
            "seconds": [("read", 0.1)]}


def test_a_source_asked_with_zero_reads_all_its_documents(capsys):
    print_summary(summary(requested=0))
    assert "40 docs" in capsys.readouterr().out.split("wiki")[1].split("\n")[0]
    print_summary(summary(requested=0))
    assert "(all asked)" in capsys.readouterr().out
    print_summary(summary(requested=50))
    assert "(of 50 asked)" in capsys.readouterr().out


def test_query_cost_gives_an_epoch_share_only_for_a_long_epoch():
    # a 1 s epoch: the share means nothing
    short = {"seconds": 20.7, "samples": 400, "epoch_fraction": 20.7 / 1.0}
    assert query_cost(short) == "21s (19 samples/s)"
    long = {"seconds": 33.0, "samples": 9600, "epoch_fraction": 33.0 / 64.0}
    assert query_cost(long) == "33s (291 samples/s), 0.52 of a training epoch"


def test_the_report_says_how_many_epochs_each_row_trained():
    table = {"baseline": {"epochs": 1.0, "steps": 326}, "filter": {"epochs": 1.6556, "steps": 326},
             "ifguide": {"epochs": 1.0, "steps": 326},
             "dpo": {"epochs": None, "steps": 33}}  # fine-tuned: not named
    note = " ".join(_epochs_note(table))
    assert note.strip() == ("Every model trains 326 steps; on its own blocks that is 1.00 epochs for the "
                            "baseline, 1.66 for filter.")
    assert _epochs_note({"baseline": {"epochs": 1.0, "steps": 3}, "ifguide": {"epochs": 1.0,
        "steps": 3}}) == []
    table["ifguide-matched"] = {"epochs": 1.004, "steps": 327}  # a longer row is named even at ~1 epoch
    note = " ".join(_epochs_note(table))
    assert note.strip() == ("Every model trains 326 steps, except ifguide-matched (327), trained until they "
                            "learned as many tokens as the filter; on its own blocks that is 1.00 epochs for "
                            "the baseline, 1.66 for filter.")


def test_training_prints_no_log_dictionaries(tmp_path, capsys):
    import numpy as np
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, TrainingArguments

    from ifguide.data import BlockDataset
    from ifguide.training import SuppressionTrainer, show_progress

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2,
                                             intermediate_size=32))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             logging_steps=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    blocks = np.arange(48, dtype=np.int32).reshape(6, 8) % 8
    trainer = show_progress(SuppressionTrainer(model=model, args=args, train_dataset=BlockDataset(blocks)),
                            "train x")
    trainer.train()
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "{'loss'" not in shown and "'train_runtime'" not in shown
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 3  # the logs are still kept


def test_warmup_is_the_whole_number_of_steps_transformers_makes_of_a_ratio(tmp_path):
    from transformers import TrainingArguments

    from ifguide.training import warmup_steps

    for ratio, steps in ((0.02, 326), (0.1, 33), (0.02, 378), (0.0, 10)):
        ours = warmup_steps(ratio, steps)
        theirs = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio).get_warmup_steps(steps)
        assert isinstance(ours, int) and ours == theirs  # the same schedule as the ratio gave under 5.x


def test_the_eval_line_gives_percentages_with_one_decimal():
    from ifguide.evaluation.stage import summary_line

    results = {"scorers": {"p": {"all": {"emt": 0.5123, "tp": 0.4, "share": 0.07}}},
               "perplexity": {"heldout": 153.26}}
    expected = "eval m-s0: EMT 0.512, TP 0.400, share>=0.5 7.0% (p), ppl held-out 153.3"
    assert summary_line("m-s0", results, "p") == expected
    assert summary_line("rad-s0", results | {"perplexity": None}, "p").endswith("ppl n/a (RAD)")


def test_the_library_is_silent_unless_asked_and_the_cli_takes_quiet_and_verbose(tmp_path, capsys):
    import logging
    import subprocess
    import sys

    from ifguide.artifacts import Stage
    from ifguide.console import show_messages

    code = ("from pathlib import Path; from ifguide.artifacts import Stage\n"
            f"stage = Stage(Path({str(tmp_path / 'a')!r}), 'select', {{}}, {{}})\n"
            "with stage.build(): pass\n"
            "assert stage.is_done()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == done.stderr == ""  # imported as a library: nothing printed
    stage = Stage(tmp_path / "a", "select", {}, {})
    capsys.readouterr()
    try:
        for level, shown in ((logging.WARNING, ""), (logging.INFO,
                                                     f"select: {tmp_path / 'a'} is up to date\n")):
            show_messages(level)
            assert stage.is_done() and capsys.readouterr().out == shown
    finally:
        show_messages()
    from ifguide.cli import _parser

    assert _parser().parse_args(["report", "--run", "r", "-q"]).quiet
    assert _parser().parse_args(["train", "--run", "r", "--name", "b", "--verbose"]).verbose


def test_the_cli_hides_library_deprecation_notes_and_keeps_other_warnings(tmp_path):
    import warnings

    from transformers import TrainingArguments

    from ifguide.console import hide_library_notes

    def caught(hide: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if hide:
                hide_library_notes()
            TrainingArguments(str(tmp_path), gradient_checkpointing=False, use_cpu=True, report_to="none")
            warnings.warn_explicit("ours", UserWarning, "pipeline.py", 1, module="ifguide.pipeline")
            return [f"{w.category.__name__}: {w.message}" for w in seen]

    shown = caught(hide=False)
    assert any(line.startswith("FutureWarning") and "gradient_checkpointing" in line for line in shown), shown
    assert caught(hide=True) == ["UserWarning: ours"]


def test_the_cli_drops_the_checkpoint_mtime_note_and_keeps_the_loggers_other_lines():
    import logging

    from ifguide.console import hide_library_notes

    logger = logging.getLogger("transformers.trainer_utils")  # where sort_checkpoints logs the note
    note = "mtime may not be reliable on this filesystem, falling back to numerical ordering"
    seen: list[str] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(catch)
    earlier = list(logger.filters)  # another test may have called hide_library_notes in this process
    for found in earlier:
        logger.removeFilter(found)
    try:
        logger.warning(note)
        hide_library_notes()
        logger.warning(note)
        logger.warning("another note")
    finally:
        logger.removeHandler(catch)
    assert seen == [note, "another note"]
    assert len(logger.filters) == 1  # called again, it adds no second filter
    hide_library_notes()
    assert len(logger.filters) == 1
