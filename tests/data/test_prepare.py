"""The prepared `quick` run: disjoint queries and prompts, block provenance, tokenizer round trip."""

import json

import numpy as np
from datasets import load_from_disk

from ifguide.data.blocks import load_blocks, load_documents
from ifguide.data.tokenizer import load_tokenizer


def test_queries_and_eval_prompts_share_no_prompt(quick_run):
    queries = set(load_from_disk(str(quick_run.data() / "queries"))["prompt"])
    prompts = {json.loads(line)["prompt"] for line in (quick_run.data() / "prompts" / "rtp.jsonl").open()}
    assert queries and prompts and not queries & prompts


def test_query_labels_cover_only_the_continuation(quick_run):
    q = load_from_disk(str(quick_run.data() / "queries"))[0]
    labels, mask = np.array(q["labels"]), np.array(q["attention_mask"])
    labelled = labels != -100
    assert labelled.any() and not labelled[mask == 0].any()
    assert (labels[labelled] == np.array(q["input_ids"])[labelled]).all()
    assert not labelled[0]  # the prompt comes first


def test_block_provenance_maps_back_to_source_text(quick_run):
    tok = load_tokenizer(quick_run.data())
    blocks = load_blocks(quick_run.data())
    docs = load_documents(quick_run.data())
    sources = json.loads((quick_run.data() / "info.json").read_text())["sources"]
    checked = 0
    for b in range(0, len(blocks), max(1, len(blocks) // 100)):
        row = blocks[b]
        ids, owners, srcs = map(np.array, (row["input_ids"], row["doc_ids"], row["source_ids"]))
        for doc in np.unique(owners)[1:-1]:  # documents wholly inside the block
            span = ids[owners == doc]
            assert tok.decode(span.tolist(), skip_special_tokens=True) == docs[int(doc)]["text"]
            assert sources[int(srcs[owners == doc][0])] == docs[int(doc)]["source"]
            checked += 1
    assert checked > 10


def test_tokenizer_round_trips(quick_run):
    tok = load_tokenizer(quick_run.data())
    for text in ["Hello, world!", "naïve café — “quotes” ☃ 漢字", "  spaces\n\ttabs  ", "@user RT: lol!!!"]:
        assert tok.decode(tok(text)["input_ids"]) == text
