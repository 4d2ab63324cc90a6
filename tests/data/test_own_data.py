"""Your own corpus files, tokenizer and checkpoint (GPT-2 and Llama) through the whole pipeline."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ifguide.artifacts import Run, read_info
from ifguide.config import config_to_dict, load_config, with_overrides
from ifguide.data.blocks import block_array, load_documents
from ifguide.data.stage import prepare
from ifguide.data.tokenizer import load_tokenizer
from ifguide.errors import IfguideError
from ifguide.model import load_model, with_linear_projections
from tests.helpers import corpus_rows


def write_inputs(folder: Path) -> list[dict]:
    """The same kind of documents in each of the four formats; returns the data.corpus entries."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = corpus_rows(120)
    lines = [json.dumps(r) for r in rows[:60]] + [json.dumps({"body": "  ", "toxic": False})]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[60:90]), folder / "b.parquet")
    Dataset.from_list(rows[90:]).save_to_disk(str(folder / "c_arrow"))
    (folder / "texts").mkdir(exist_ok=True)
    (folder / "texts" / "one.txt").write_text("first paragraph here\n\nsecond paragraph there\n")
    return [{"path": str(folder / "*.jsonl"), "source": "mine_jsonl", "text_field": "body",
             "label_field": "toxic"},
            {"path": str(folder / "b.parquet"), "source": "mine_parquet", "format": "parquet",
             "text_field": "body",
             "label_field": "score"},
            {"path": str(folder / "c_arrow"), "source": "mine_arrow", "format": "arrow",
             "text_field": "body"},
            {"path": str(folder / "texts" / "*.txt"), "source": "mine_txt", "format": "txt",
             "txt_split": "paragraph"}]


def write_config(folder: Path, data: dict, model: dict | None = None, train: dict | None = None) -> str:
    """The quick preset with 200 Davidson tweets as the only mirror source, plus `data`, `model` and
    `train`."""
    values = config_to_dict(load_config("quick"))
    values["data"].update({"sources": {"davidson": 200}, "num_toxic_queries": 8, "num_nontoxic_queries": 8,
                           "block_size": 32, **data})
    values["model"].update(model or {})
    values["train"].update(train or {})
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_corpus_files_in_four_formats_with_labels_and_provenance(tmp_path):
    corpus = write_inputs(tmp_path / "in")
    cfg = load_config(write_config(tmp_path, {"corpus": corpus}))
    run = Run(tmp_path / "run")
    prepare(cfg, run)
    docs = load_documents(run.data()).to_pandas()
    by_source = docs.groupby("source").size().to_dict()
    info = read_info(run.data())
    kept = {s: by_source.get(s, 0) for s in ("mine_jsonl", "mine_parquet", "mine_arrow", "mine_txt")}
    mine = docs[docs.source.str.startswith("mine_")]
    assert 0 <= 122 - sum(kept.values()) <= 15  # a seeded 2% of the documents not labelled toxic is held out
    assert mine.toxic_label.sum() == 30  # every toxic-labelled document stays in training
    assert info["summary"]["per_source"]["mine_jsonl"]["empty_skipped"] == 1
    labels = docs.set_index("text")["toxic_label"]
    checked = [labels[r["body"]] == r["toxic"] for r in corpus_rows(120)[:90] if r["body"] in labels.index]
    # jsonl (booleans) and parquet (scores >= 0.5) labels carried over
    assert len(checked) >= 80 and all(checked)
    assert not docs[docs.source == "mine_arrow"].toxic_label.any()
    assert set(info["toxic_sources"]) == {"davidson", "mine_jsonl", "mine_parquet"}
    if kept["mine_txt"]:
        assert set(docs[docs.source == "mine_txt"].text) <= {"first paragraph here", "second paragraph there"}


def test_blocks_and_documents_match_an_in_memory_reference(tmp_path):
    """The streamed blocks equal the concatenation of the kept documents (each + EOS) cut into blocks."""
    corpus = write_inputs(tmp_path / "in")
    cfg = load_config(write_config(tmp_path, {"corpus": corpus, "num_proc": 2}))
    run = Run(tmp_path / "run")
    prepare(cfg, run)
    tok = load_tokenizer(run.data())
    docs = load_documents(run.data())
    stream = np.concatenate([np.asarray(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                             for t in docs["text"]])
    owner = np.concatenate([np.full(n, d) for d, n in zip(docs["doc_id"], docs["num_tokens"])])
    from ifguide.data.blocks import load_blocks

    blocks = load_blocks(run.data()).with_format("numpy")
    n = len(blocks)
    assert n == len(stream) // 32
    assert np.array_equal(np.asarray(blocks["input_ids"]).ravel(), stream[: n * 32])
    assert np.array_equal(np.asarray(blocks["doc_ids"]).ravel(), owner[: n * 32])
    flagged = np.asarray(docs["blocklisted"])
    kept = np.isin(owner, np.flatnonzero(~flagged))
    filtered = np.asarray(load_blocks(run.data(), "blocks_filter").with_format("numpy")["input_ids"]).ravel()
    assert np.array_equal(filtered, stream[kept][: len(filtered)]) and len(filtered) == kept.sum() // 32 * 32
    assert flagged.any() and not flagged.all()


@pytest.mark.parametrize("entry, message", [
    ({"path": "nowhere/*.jsonl", "source": "x"}, "no file matches"),
    ({"path": "IN/a.jsonl", "source": "x", "text_field": "content"}, "has no 'content' field"),
    ({"path": "IN/b.parquet", "source": "x", "format": "parquet"}, "has no column 'text'"),
    ({"path": "IN/bad.jsonl", "source": "x"}, "line 2 is not JSON"),
    ({"path": "IN/a.jsonl", "source": "x", "text_field": "body", "label_field": "missing"},
     "no 'missing' field"),
    ({"path": "IN", "source": "x"}, "is a folder; give a file or a glob"),
    ({"path": "IN/labels.jsonl", "source": "x", "label_field": "y"}, "line 1: label nan is not a score in"),
    ({"path": "IN/labels.jsonl", "source": "x", "label_field": "z"}, "line 2: label -3 is not a score in"),
    ({"path": "IN/labels.jsonl", "source": "x", "label_field": "c"}, "line 1: label 2 is not a score in"),
])
def test_bad_corpus_inputs_name_the_file(tmp_path, entry, message):
    write_inputs(tmp_path / "in")
    (tmp_path / "in" / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (tmp_path / "in" / "labels.jsonl").write_text('{"text": "a", "y": NaN, "z": 0, "c": 2}\n'
                                                  '{"text": "b", "y": 1, "z": -3, "c": 0}\n')
    entry = {**entry, "path": entry["path"].replace("IN", str(tmp_path / "in"))}
    cfg = load_config(write_config(tmp_path, {"corpus": [entry]}))
    with pytest.raises(IfguideError, match=message):
        prepare(cfg, Run(tmp_path / "run"))
    assert not (tmp_path / "run" / "data").exists()


def test_corpus_paths_are_read_once_literally_and_empty_files_are_counted(tmp_path, capsys):
    from ifguide.config import CorpusInput
    from ifguide.data.corpora import corpus_files, file_documents

    folder = tmp_path / "in[1]"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n')
    (folder / "empty.jsonl").write_text("")
    (folder / "loop").symlink_to(folder)  # a glob with ** would walk it round and round
    spec = CorpusInput(path=str(folder / "a.jsonl"), source="x")  # '[1]' is part of the name, not a pattern
    assert corpus_files(spec) == [folder / "a.jsonl"]
    spec = CorpusInput(path=str(tmp_path / "in[[]1]" / "**" / "*.jsonl"), source="x")
    assert [p.name for p in corpus_files(spec)] == ["a.jsonl", "empty.jsonl"]
    empty = Counter()
    assert list(file_documents(spec, empty)) == [("one", False)] and empty == {"x": 1}
    assert "empty.jsonl holds no document" in capsys.readouterr().err


def test_corpus_config_is_checked():
    from ifguide.config import config_from_dict

    base = config_to_dict(load_config("quick"))
    for corpus, message in [([{"source": "x"}], "needs 'path'"),
                            ([{"path": "a", "source": "x", "format": "csv"}], "format. must be one of jsonl"),
                            ([{"path": "a", "source": "davidson"}], "must be unique and differ")]:
        with pytest.raises(IfguideError, match=message):
            config_from_dict({**base, "data": {**base["data"], "corpus": corpus}})


def tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_gpt2_conv1d_as_linear_gives_equal_logits():
    model = tiny_gpt2(100).eval()
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        before = model(ids).logits
        converted = with_linear_projections(model)
        after = converted(ids).logits
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "Conv1D" not in kinds and "Linear" in kinds
    assert torch.allclose(before, after, atol=1e-6, rtol=0)


def save_checkpoint(kind: str, folder: Path, mirror: Path) -> Path:
    """A small GPT-2 with the GPT-2 BPE files, or a small Llama with the NeoX tokenizer, via
    save_pretrained."""
    if kind == "gpt2":
        tok = GPT2TokenizerFast.from_pretrained(str(mirror / "tokenizers/gpt2"))  # vocab.json + merges.txt
        model = tiny_gpt2(len(tok))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(mirror / "tokenizers/neox-20b/tokenizer.json"),
                                      eos_token="<|endoftext|>")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2,
                                             max_position_embeddings=64))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_own_checkpoint_and_tokenizer_end_to_end(tmp_path, data_mirror, kind, caplog):
    """prepare -> fine-tune (baseline) -> factors -> scores -> select -> IF-Guide fine-tune, on a saved
    checkpoint."""
    from ifguide.influence import factors, scores
    from ifguide.selection.stage import select
    from ifguide.training.stage import train

    checkpoint = save_checkpoint(kind, tmp_path / kind, data_mirror)
    corpus = write_inputs(tmp_path / "in")[:2]
    data = {"corpus": corpus, "tokenizer": str(checkpoint), "heldout_fraction": 0.2}
    cfg = load_config(write_config(tmp_path, data, model={"init_from": str(checkpoint)},
                                   train={"max_steps": 6, "lr": 1e-3}))
    run = Run(tmp_path / "run")
    prepare(cfg, run)
    run.save_config(cfg)
    own = len(PreTrainedTokenizerFast.from_pretrained(str(checkpoint)))
    assert len(load_tokenizer(run.data())) == own + 2  # the control tokens; the checkpoint gets their rows
    train(cfg, run, "baseline")
    logging.getLogger("ifguide").addHandler(caplog.handler)  # the CLI's tests may have stopped propagation
    try:
        factors(cfg, run, "baseline")  # quick tracks the head: a 50k-token one is left out, in one warning
    finally:
        logging.getLogger("ifguide").removeHandler(caplog.handler)
    assert "LM head is left out: its ekfac factors for 50,2" in caplog.text and "18.8 GiB" in caplog.text
    assert "lm_head" not in read_info(run.factors("baseline"))["tracked_modules"]
    scores(cfg, run, "baseline", queries="rtp")  # named without the head it left out
    assert read_info(run.scores("baseline", "toxic-minus-nontoxic")) is not None
    scores(cfg, run, "baseline", name="differential", queries="rtp")
    select(cfg, run, "baseline/differential", name="ifguide")
    assert read_info(run.mask("ifguide"))["marked_tokens"] > 0
    train(cfg, run, "ifguide", mask="ifguide", init=str(checkpoint))
    start = load_file(next(checkpoint.glob("*.safetensors")))
    tuned = load_file(run.model("ifguide") / "model.safetensors")
    arch = json.loads((run.model("ifguide") / "config.json").read_text())["architectures"][0]
    # saved as the user's own class
    assert arch == ("GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM")
    changed = [k for k in tuned if not torch.equal(tuned[k], start[k])]
    assert set(tuned) == set(start) and changed
    assert load_model(run.model("ifguide")).get_input_embeddings().num_embeddings == own + 2
    # a diagonal head fits any vocabulary: tracked, preconditioned and scored beside the blocks' EK-FAC
    diagonal = with_overrides(cfg, "influence", head_strategy="diagonal")
    factors(diagonal, run, "baseline", force=True)
    assert read_info(run.factors("baseline"))["fitted_apart"] == {"lm_head": "diagonal"}
    assert scores(diagonal, run, "baseline", queries="rtp").name == "toxic-minus-nontoxic-head"
    direction = read_info(run.direction("baseline", "toxic-minus-nontoxic-head"))
    assert direction["tracked_modules"][-1] == "lm_head"
    baseline = load_file(run.model("baseline") / "model.safetensors")
    assert any(not torch.equal(tuned[k], baseline[k]) for k in tuned)


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path, data_mirror):
    from ifguide.training.stage import train

    checkpoint = tmp_path / "small"
    tiny_gpt2(500).save_pretrained(checkpoint)
    cfg = load_config(write_config(tmp_path, {"corpus": write_inputs(tmp_path / "in")[:1]},
                                   model={"init_from": str(checkpoint)}, train={"max_steps": 2}))
    run = Run(tmp_path / "run")
    prepare(cfg, run)
    with pytest.raises(IfguideError, match="token embeddings but the run's tokenizer has"):
        train(cfg, run, "baseline")


def test_a_block_too_long_for_the_held_out_pages_names_the_longest_that_fits(tmp_path):
    """200 tweets hold a few hundred held-out tokens: a 4,096-token block is refused with the longest block
    both the training and held-out tokens allow, and that block size then prepares."""
    cfg = load_config(write_config(tmp_path, {"block_size": 4096, "heldout_fraction": 0.05}))
    with pytest.raises(IfguideError, match=r"set data.block_size to at most (\d+)") as refused:
        prepare(cfg, Run(tmp_path / "run"))
    longest = int(re.search(r"at most (\d+)", str(refused.value)).group(1))
    assert 0 < longest < 4096
    prepare(load_config(write_config(tmp_path, {"block_size": longest, "heldout_fraction": 0.05})),
            Run(tmp_path / "run2"))
    assert len(block_array(Run(tmp_path / "run2"), "heldout_blocks")) == 1
