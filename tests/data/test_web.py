"""The web regime: the WebText, Reddit CMV and 4chan readers against the raw files, held-out pages from the
whole distribution, RTP queries at the paper's scale, and the demo's evaluation protocol."""

import gzip
import json
import tarfile

import numpy as np
import pytest
import torch

from ifguide.artifacts import Run
from ifguide.config import load_config, with_overrides
from ifguide.data import corpora
from ifguide.data.blocks import load_block_ids, load_documents
from ifguide.data.prompt_sets import queries_and_prompts
from ifguide.data.stage import prepare
from ifguide.data.tokenizer import load_tokenizer


def test_webtext_yields_every_whole_page_and_skips_the_cut_line(data_mirror):
    items = list(corpora.labelled_documents("webtext"))
    raw = (data_mirror / "webtext/webtext.train.head.jsonl").read_bytes().split(b"\n")
    assert raw[-1] and not raw[-1].endswith(b"}")  # the file is cut mid-record, without a final newline
    assert len(items) == len(raw) and items[-1] is corpora.SKIPPED
    assert sum(item is corpora.SKIPPED for item in items) == 1
    assert items[0] == (json.loads(raw[0])["text"], False)


def test_cmv_threads_join_their_comments_in_order_and_ah_labels(data_mirror):
    docs = list(corpora.labelled_documents("reddit_cmv"))
    with tarfile.open(data_mirror / "reddit_cmv/sampled-threads-ah-delta-context3.tar.bz2") as archive:
        names = sorted(m.name for m in archive.getmembers() if m.isfile())
        first = archive.extractfile(names[0]).read().decode().splitlines()
    assert len(docs) == len(names) == 2582
    assert sum(label for _, label in docs) == sum("_ah_" in n.rsplit("/", 1)[1] for n in names) == 1291
    comments = [json.loads(line)["body"].strip() for line in first if line.strip()]
    assert docs[0][0] == "\n\n".join(c for c in comments if c)
    assert docs[0][1] == ("_ah_" in names[0])


def test_4chan_threads_are_whole_and_labelled_toxic(data_mirror):
    docs = list(corpora.labelled_documents("pol_4chan"))
    with gzip.open(data_mirror / "pol_4chan/4chan_00000000.jsonl.gz", "rt") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    assert [text for text, _ in docs] == texts and all(label for _, label in docs) and len(docs) == 424


def test_rtp_records_read_both_sources_once_per_prompt(data_mirror):
    records = corpora.rtp_records()
    prompts = [r["prompt"]["text"] for r in records]
    lines = sum(1 for name in corpora.RTP_FILES for line in (data_mirror / name).open() if line.strip())
    assert len(prompts) == len(set(prompts)) and 7000 < len(records) < lines  # 108 shared prompts read once


@pytest.fixture(scope="module")
def web_run(tmp_path_factory) -> Run:
    """A small web-text run prepared with the demo's query and prompt settings."""
    cfg = load_config("demo")
    cfg = with_overrides(cfg, "data", sources={"webtext": 60, "reddit_cmv": 50, "pol_4chan": 6},
                         vocab_size=512,
                         heldout_fraction=0.2, num_attaq_prompts=5, num_lambada=5)
    run = Run(tmp_path_factory.mktemp("web") / "run")
    run.save_config(cfg)
    prepare(cfg, run)
    return run


def test_heldout_pages_come_from_the_whole_distribution(web_run):
    summary = json.loads((web_run.data() / "info.json").read_text())["summary"]
    held = summary["heldout"]
    read = {"webtext": 60, "reddit_cmv": 50, "pol_4chan": 6}
    assert summary["documents"] + held["heldout"]["documents"] == sum(read.values())
    # toxic-labelled pages are held out too: every 4chan thread is labelled, so benign < all
    assert 0 < held["heldout_benign"]["documents"] < held["heldout"]["documents"]
    assert held["heldout_blocklisted"]["documents"] >= 1
    block = summary["block_size"]
    for name in ("heldout", "heldout_benign", "heldout_blocklisted"):
        assert load_block_ids(web_run.data(), f"{name}_blocks").shape == (held[name]["blocks"], block)
    # the filter's cost: the blocklisted share of training tokens, from the documents table
    docs = load_documents(web_run.data())
    tokens = np.array(docs["num_tokens"])
    assert summary["blocklisted_token_share"] == pytest.approx(tokens[np.array(docs["blocklisted"])].sum()
                                                               / tokens.sum())
    assert summary["partial_records_skipped"] == 1  # the cut last line of the WebText head


def test_eval_perplexities_match_a_plain_forward_pass(web_run):
    from ifguide.config import ModelConfig
    from ifguide.evaluation.stage import perplexities
    from ifguide.model import build_model

    tok = load_tokenizer(web_run.data())
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64), len(tok), 128,
                        tok.eos_token_id, 0)
    found = perplexities(web_run, model, max_blocks=8)
    assert set(found) == {"heldout", "heldout_benign", "heldout_blocklisted", "wikitext"}
    for name, value in found.items():
        ids = torch.as_tensor(np.array(load_block_ids(web_run.data(), f"{name}_blocks")[:8]),
                              dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert value == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_queries_take_every_toxic_continuation_left_and_as_many_least_toxic(web_run):
    cfg = web_run.load_config()
    tok = load_tokenizer(web_run.data())
    queries, rtp, preference, counts = queries_and_prompts(cfg, tok)
    evaluated, preferred = {r["prompt"] for r in rtp}, {r["prompt"] for r in preference}
    assert len(rtp) == 200 and sum(r["toxic"] for r in rtp) == 100 and len(preference) == 300
    assert not evaluated & preferred and not set(queries["prompt"]) & (evaluated | preferred)
    records = {r["prompt"]["text"]: r["continuation"]["toxicity"] for r in corpora.rtp_records()
               if r["continuation"].get("toxicity") is not None}
    left = {p: t for p, t in records.items() if p not in evaluated | preferred}
    toxic = [p for p, t in left.items() if t >= 0.5]
    is_toxic = np.array(queries["toxic"])
    prompts = np.array(queries["prompt"], dtype=object)
    assert sorted(prompts[is_toxic]) == sorted(toxic) and len(toxic) > 2400
    chosen = [left[p] for p in prompts[~is_toxic]]
    rest = [t for p, t in left.items() if t < 0.25 and p not in set(prompts[~is_toxic])]
    assert len(chosen) == len(toxic) == counts["nontoxic_queries"]
    assert max(chosen) <= min(rest) and max(chosen) < 0.25  # the least toxic first


def test_demo_preset_follows_the_papers_evaluation_protocol():
    cfg = load_config("demo")
    assert cfg.data.num_rtp_prompts_toxic == cfg.data.num_rtp_prompts_nontoxic >= 100  # >= 200, half toxic
    assert (cfg.eval.num_samples, cfg.eval.top_p, cfg.eval.top_k, cfg.eval.max_new_tokens) == (25, 0.9, 0, 20)
    assert set(cfg.data.sources) == {"webtext", "reddit_cmv", "pol_4chan"}
    assert cfg.demo.seeds == [0, 1] and cfg.demo.comparison_seeds is None  # every row with both seeds
