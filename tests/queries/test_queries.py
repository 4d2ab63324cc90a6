"""Self-generated queries: rows match their labels and thresholds, evaluation prompts are refused, and the
report never lets the labelling scorer judge the row it steered."""

import json

import numpy as np
import pytest

from ifguide.artifacts import Run
from ifguide.config import QueriesConfig, load_config, with_overrides
from ifguide.errors import IfguideError
from ifguide.evaluation.results import _labelled_note, _name
from ifguide.evaluation.tables import check_targets
from ifguide.queries.stage import labelled_rows, pick_rows, query_prompts, query_sampling, saved_column


class CharTokenizer:
    """One token per character (id = code point), pad 0: rows can be checked by hand."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_rows_follow_thresholds_pairing_and_caps():
    # 3 prompts x 3 samples: scores by hand
    prompt_index = np.repeat(np.arange(3), 3)
    toxicity = np.array([0.9, 0.05, 0.3,   # prompt 0: toxic, non-toxic, in between (dropped)
                         0.5, 0.6, 0.2,    # prompt 1: two toxic (>= 0.5 counts), none non-toxic
                         0.0, 0.09, 0.1])  # prompt 2: two non-toxic (< 0.1), 0.1 itself is not
    empty = np.zeros(9, dtype=bool)
    toxic, nontoxic = pick_rows(prompt_index, toxicity, empty, 0.5, 0.1, False, 0, 0, 0)
    assert toxic.tolist() == [0, 3, 4] and nontoxic.tolist() == [1, 6, 7]
    toxic, nontoxic = pick_rows(prompt_index, toxicity, empty, 0.5, 0.1, True, 0, 0, 0)
    assert toxic.tolist() == [0] and nontoxic.tolist() == [1]  # only prompt 0 has both kinds
    empty[0] = True  # an empty continuation is never a row
    assert 0 not in pick_rows(prompt_index, toxicity, empty, 0.5, 0.1, False, 0, 0, 0)[0]
    toxic, nontoxic = pick_rows(prompt_index, toxicity, np.zeros(9, bool), 0.5, 0.1, False, 2, 1, 0)
    assert len(toxic) == 2 and set(toxic) <= {0, 3, 4} and len(nontoxic) == 1 and set(nontoxic) <= {1, 6, 7}
    again = pick_rows(prompt_index, toxicity, np.zeros(9, bool), 0.5, 0.1, False, 2, 1, 0)
    assert toxic.tolist() == again[0].tolist()  # seeded


def test_labelled_rows_carry_the_continuation_loss_and_label():
    prompts = ["ab", "xyz"]
    texts = ["CD", "e", "F", "gh"]
    prompt_index = np.array([0, 0, 1, 1])
    qcfg = QueriesConfig(toxic_threshold=0.5, nontoxic_threshold=0.1)
    rows, toxic, nontoxic = labelled_rows(CharTokenizer(), prompts, texts, prompt_index,
                                          np.array([0.7, 0.05, 0.2, 0.01]), qcfg, max_tokens=6)
    assert toxic.tolist() == [0] and nontoxic.tolist() == [1, 3]
    assert rows["toxic"] == [True, False, False]
    assert rows["prompt"] == ["ab", "ab", "xyz"]
    # row 0: prompt "ab" then continuation "CD", loss on the continuation only, right padding
    assert rows["input_ids"][0] == [97, 98, 67, 68, 0, 0]
    assert rows["labels"][0] == [-100, -100, 67, 68, -100, -100]
    assert rows["attention_mask"][0] == [1, 1, 1, 1, 0, 0]
    # row 2: "xyz" + "gh" fits 6 exactly
    assert rows["input_ids"][2] == [120, 121, 122, 103, 104, 0]
    assert rows["labels"][2] == [-100, -100, -100, 103, 104, -100]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluation_prompts_are_refused_as_query_prompts(tmp_path):
    run = Run(tmp_path / "run")
    _write(run.data() / "prompts" / "rtp.jsonl", [{"prompt": "So I said to him", "toxic": False}])
    _write(run.data() / "prompts" / "bold.jsonl", [{"prompt": "Jane Austen was"}])
    mine = tmp_path / "mine.jsonl"
    _write(mine, [{"prompt": "A fresh prompt"}, {"prompt": "  So I said to him "}])
    with pytest.raises(IfguideError, match="1 query prompt.*rtp evaluation prompts"):
        query_prompts(run, str(mine))
    for name in ("rtp", "bold"):
        with pytest.raises(IfguideError, match="is an evaluation prompt set"):
            query_prompts(run, name)
    _write(mine, [{"prompt": "A fresh prompt"}, {"prompt": "Another one"}])
    prompts, check = query_prompts(run, str(mine))
    assert prompts == ["A fresh prompt", "Another one"]
    assert check["overlap"] == 0 and set(check["evaluation_sets"]) == {"rtp", "bold"}


def test_queries_settings_are_checked():
    cfg = load_config("quick")
    with pytest.raises(IfguideError, match="thresholds"):
        with_overrides(cfg, "queries", toxic_threshold=0.05)
    with pytest.raises(IfguideError, match="samples_per_prompt"):
        with_overrides(cfg, "queries", samples_per_prompt=0)
    with pytest.raises(IfguideError, match="queries.prompt_batch_size must be >= 1"):
        with_overrides(cfg, "queries", prompt_batch_size=0)
    # queries sample with the evaluation protocol but their own count, seed and batch size (a batch is seeded)
    sampling = query_sampling(with_overrides(cfg, "queries", prompt_batch_size=5), samples=3, seed=7)
    assert (sampling.num_samples, sampling.seed, sampling.prompt_batch_size) == (3, 7, 5)
    assert (sampling.top_p, sampling.max_new_tokens) == (cfg.eval.top_p, cfg.eval.max_new_tokens)
    with pytest.raises(IfguideError, match="built-in RTP query set"):
        Run("x").queries("rtp")


def _row(emt: float, share: float, ppl: float = 100.0) -> dict:
    return {"all": {"emt": {"value": emt}, "tp": {"value": emt}, "share": {"value": share}},
            "perplexity": {"heldout": ppl}}


def test_a_labelling_scorer_never_judges_the_row_it_labelled():
    table = {"baseline": _row(0.8, 0.2), "filter": _row(0.5, 0.05), "ifguide-self": _row(0.4, 0.04, 104.0),
             "ifguide": _row(0.7, 0.1)}
    labellers = {"ifguide-self": {"jigsaw-lstm"}}
    judged = check_targets(table, {}, "profanity-check", labellers)
    assert judged["ifguide-self"]["emt_reduction_x"] == pytest.approx(2.0)
    assert judged["ifguide-self"]["share_reduction_x"] == pytest.approx(5.0)
    assert judged["ifguide-self"]["heldout_ppl_rise"] == pytest.approx(0.04)
    labelled = check_targets(table, {}, "jigsaw-lstm", labellers)["ifguide-self"]
    assert labelled == {"labelled_by_this_scorer": True}
    assert _name("ifguide-self", "jigsaw-lstm", labellers).endswith("‡")
    assert _name("ifguide-self", "profanity-check", labellers) == "ifguide-self"
    assert "jigsaw-lstm labelled the queries" in " ".join(_labelled_note(table, "jigsaw-lstm", labellers))
    assert _labelled_note(table, "profanity-check", labellers) == []


def test_an_evaluation_set_sharing_a_query_prompt_is_refused(tmp_path):
    from ifguide.evaluation.stage import refuse_query_prompts

    run = Run(tmp_path / "run")
    _write(run.root / "queries" / "self" / "samples.jsonl",
           [{"prompt": "Query prompt one", "continuation": "x", "toxicity": 0.7, "row": "toxic"}])
    refuse_query_prompts(run, [{"prompt": "Something else", "toxic": None}])
    with pytest.raises(IfguideError, match="query prompt of self"):
        refuse_query_prompts(run, [{"prompt": "Query prompt one ", "toxic": None}])


def test_prompt_subset_is_seeded_ordered_and_bounded():
    from ifguide.queries.stage import prompt_subset

    prompts = [f"p{i}" for i in range(50)]
    picked = prompt_subset(prompts, 20, seed=3)
    assert len(picked) == len(set(picked)) == 20 and picked == sorted(picked, key=prompts.index)
    assert picked == prompt_subset(prompts, 20, seed=3) and picked != prompt_subset(prompts, 20, seed=4)
    assert prompt_subset(prompts, 0, seed=3) == prompts and prompt_subset(prompts, 80, seed=3) == prompts


def test_saved_column_reads_what_datasets_saved_in_order(tmp_path):
    from datasets import Dataset, load_from_disk

    toxic = [k % 3 == 0 for k in range(25)]
    rows = Dataset.from_dict({"prompt": [f"prompt {k}" for k in range(25)], "toxic": toxic})
    rows.save_to_disk(str(tmp_path / "rows"), num_shards=3)
    assert len(list((tmp_path / "rows").glob("data-*.arrow"))) == 3
    assert saved_column(tmp_path / "rows", "prompt") == load_from_disk(str(tmp_path / "rows"))["prompt"]
    assert saved_column(tmp_path / "rows", "toxic") == toxic


def test_query_set_names_join_distinct_sets(tmp_path):
    from ifguide.queries.stage import query_artifacts, query_set_names

    assert query_set_names("self") == ["self"] and query_set_names("rtp+self") == ["rtp", "self"]
    assert query_artifacts(Run(tmp_path), "rtp+self") == [Run(tmp_path).queries("self")]
    for wrong in ("rtp+rtp", "rtp+", "+self"):
        with pytest.raises(IfguideError, match="join distinct set names"):
            query_set_names(wrong)
