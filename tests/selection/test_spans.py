"""Masks in document coordinates: span arithmetic, the span file, the collator, and transfer across
tokenizers."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

import ifguide
from ifguide.artifacts import Run
from ifguide.cli import main
from ifguide.data.blocks import load_blocks, load_documents
from ifguide.errors import IfguideError
from ifguide.selection.spans import SpanMask, SuppressionCollator, document_id, merge_spans, overlap_flags


def test_spans_merge_by_hand():
    assert merge_spans([[5, 9], [0, 2], [8, 12], [12, 13], [20, 20], [2, 3]]) == [[0, 3], [5, 13]]
    assert merge_spans([]) == []


def test_overlap_flags_agree_with_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spans = np.asarray(merge_spans(rng.integers(0, 60, size=(rng.integers(0, 6), 2)).tolist()),
                           dtype=np.int64).reshape(-1, 2)
        starts = np.sort(rng.integers(0, 60, size=12))
        offsets = np.stack([starts, starts + rng.integers(0, 5, size=12)], axis=1)
        expected = [bool(e > s and any(a < e and s < b for a, b in spans)) for s, e in offsets]
        assert overlap_flags(spans, offsets).tolist() == expected


def test_span_file_round_trip_and_errors(tmp_path):
    mask = SpanMask(metadata={"mask": "m", "fingerprint": "abc"})
    mask.add("web:0:aa", [[4, 8], [0, 2]], "web")
    mask.add("web:0:aa", [[7, 10]])
    mask.add("web:1:bb", [], "web")  # no spans: not written
    mask.save(tmp_path / "m.jsonl")
    back = SpanMask.load(tmp_path / "m.jsonl")
    assert back.metadata == {"mask": "m", "fingerprint": "abc"} and list(back.spans) == ["web:0:aa"]
    assert back.spans["web:0:aa"].tolist() == [[0, 2], [4, 10]] and back.sources == {"web:0:aa": "web"}
    (tmp_path / "bad.jsonl").write_text('{"doc_id": "x", "spans": [[1, "a"]]}\n')
    with pytest.raises(IfguideError, match="bad.jsonl:1: spans must be"):
        SpanMask.load(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"doc_id": "x"}\n')
    with pytest.raises(IfguideError, match='bad.jsonl:1 must be an object with "doc_id" and "spans"'):
        SpanMask.load(tmp_path / "bad.jsonl")


def test_spared_pieces_stay_unmarked_by_hand(tmp_path):
    # "a😀b": the emoji split into two byte pieces that share its character span (1, 2); only the first is
    # suppressed
    offsets = [(0, 1), (1, 2), (1, 2), (2, 3)]
    mask = SpanMask()
    mask.add("d", [[1, 2]], "web")
    # characters alone: both pieces
    assert mask.token_flags("d", offsets).tolist() == [False, True, True, False]
    mask.add("d", [], spared=[(1, 2, 1, 2)])  # the second of the two pieces is spared
    assert mask.token_flags("d", offsets).tolist() == [False, True, False, False]
    # a tokenizer that splits the emoji into three pieces, or keeps it whole, ignores the entry
    flags = mask.token_flags("d", [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)])
    assert flags.tolist() == [False, True, True, True, False]
    assert mask.token_flags("d", [(0, 1), (1, 2), (2, 3)]).tolist() == [False, True, False]
    mask.save(tmp_path / "m.jsonl")
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])["spared"] == [[1, 2, 1, 2]]
    flags = SpanMask.load(tmp_path / "m.jsonl").token_flags("d", offsets)
    assert flags.tolist() == [False, True, False, False]
    (tmp_path / "bad.jsonl").write_text('{"doc_id": "x", "spans": [[1, 2]], "spared": [[1, 2, 0]]}\n')
    with pytest.raises(IfguideError, match="bad.jsonl:1: spared must be"):
        SpanMask.load(tmp_path / "bad.jsonl")


def test_the_collator_marks_the_positions_that_predict_suppressed_tokens():
    # document "ab cd ef": tokens "ab", " cd", " ef" at (0,2), (2,5), (5,8); " cd" is suppressed
    mask = SpanMask()
    mask.add("d1", [[3, 5]])
    features = [{"input_ids": [7, 8, 9], "offset_mapping": [[0, 2], [2, 5], [5, 8]], "doc_id": "d1"},
                {"input_ids": [5, 6], "offset_mapping": [[0, 1], [1, 2]], "doc_id": "unknown"}]
    batch = SuppressionCollator(mask, pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 8, 9], [5, 6, -100]]
    # position 0 predicts token 1 (" cd"): marked; nothing else
    assert batch["suppress"].tolist() == [[True, False, False], [False, False, False]]
    with pytest.raises(IfguideError, match="pad_token_id is None; pass a token id"):
        SuppressionCollator(mask, pad_token_id=None)
    with pytest.raises(IfguideError, match="2 offsets for 3 tokens"):
        SuppressionCollator(mask, 0)([{"input_ids": [1, 2, 3], "offset_mapping": [[0, 1], [1, 2]],
                                       "doc_id": "d1"}])


def test_the_collated_batch_gives_the_objectives_loss():
    mask = SpanMask()
    mask.add("d", [[2, 4]])
    batch = SuppressionCollator(mask, 0)([{"input_ids": [3, 1, 4, 1, 5], "doc_id": "d",
                                           "offset_mapping": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]}])
    logits = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    loss = ifguide.suppression_loss(logits, batch["labels"], batch["suppress"], lam=0.5)
    ce = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
    # tokens 2 and 3 (chars 2-4) are predicted at positions 1, 2
    weights = torch.tensor([1.0, -0.5, -0.5, 1.0])
    assert loss.item() == pytest.approx((weights * ce).sum().item() / 4, rel=1e-6)


def test_the_collator_works_in_a_trainer_with_the_default_column_removal(tmp_path):
    from datasets import Dataset
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    mask = SpanMask()
    mask.add("d", [[2, 4]])
    rows = [{"input_ids": [3, 1, 4, 1, 5], "doc_id": "d",
             "offset_mapping": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]}]
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2,
                                             intermediate_size=32))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=2,
                             report_to="none",
                             use_cpu=True, logging_steps=1)  # remove_unused_columns keeps its default, True
    collator = SuppressionCollator(mask, pad_token_id=0)
    trainer = ifguide.SuppressionTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows * 2),
                                         data_collator=collator)
    trainer.train()
    # 2 positions per batch predict chars 2-4
    assert (collator.suppressed, collator.suppressed_total) == (2, 4)
    assert trainer.suppressed_tokens == 4
    assert [e["suppressed_tokens"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    plain = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)
    # a plain Trainer drops the columns
    with pytest.raises(IfguideError, match="remove_unused_columns=False"):
        plain.train()


def test_the_public_classes_explain_themselves():
    for cls, words in ((ifguide.SpanMask, ("SpanMask.load(", "token_flags(", "overlaps")),
                       (ifguide.SuppressionTrainer, ("lam", "objective", "suppressed_tokens",
                                                     "SuppressionCollator(")),
                       (ifguide.SuppressionCollator, ("offset_mapping", "document_id(", "suppressed_total"))):
        assert all(word in cls.__doc__ for word in words), cls.__name__


def _gpt2(mirror):
    folder = mirror / "tokenizers" / "gpt2"
    tok = Tokenizer(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    return tok


def test_a_suppressed_word_is_marked_whole_under_either_tokenizer(data_mirror):
    """Spans taken from tokenizer A (GPT-2's BPE) mark, under tokenizer B (NeoX's), every token of the same
    word."""
    text = "You are such an unbelievably stupid idiot, honestly."
    word = (text.index("stupid idiot"), text.index("stupid idiot") + len("stupid idiot"))
    gpt2 = _gpt2(data_mirror)
    neox = Tokenizer.from_file(str(data_mirror / "tokenizers/neox-20b/tokenizer.json"))
    a = gpt2.encode(text)
    flags_a = [s < word[1] and word[0] < e for s, e in a.offsets]  # marked under A: the tokens of the words
    mask = SpanMask()
    mask.add("doc", [a.offsets[i] for i in np.flatnonzero(flags_a)])
    b = neox.encode(text)
    flags_b = mask.token_flags("doc", b.offsets)
    marked_b = [text[s:e] for (s, e), f in zip(b.offsets, flags_b) if f]
    assert "".join(marked_b).replace(" ", "") == "stupididiot"  # hand-checked: both words, nothing else
    assert flags_b.tolist() == [s < word[1] and word[0] < e for s, e in b.offsets]


def test_importing_ifguide_loads_no_torch():
    code = "import sys, ifguide; ifguide.SpanMask; print('torch' in sys.modules, sorted(ifguide.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1)[0] == "False"
    assert "SuppressionCollator" in out and "suppression_loss" in out


def readme_blocks(heading: str) -> dict[str, str]:
    """The first yaml, bash and python block of a README section, by fence language."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index(heading):]
    section = section[: section.index("\n## ", 1)]
    blocks: dict[str, str] = {}
    for language, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        blocks.setdefault(language, body)
    return blocks


def test_the_readme_example_runs(data_mirror, monkeypatch, tmp_path):
    """The README's own-training-loop example as printed (only the mirror path adapted): ifguide prepares a
    user's JSONL, selects and exports a mask; the plain Trainer script trains and suppresses exactly the
    tokens the run's own mask penalises (except those a stream of documents has and a script's separate
    documents do not)."""
    from tests.helpers import corpus_rows

    blocks = readme_blocks("## Use the mask in your own training loop")
    monkeypatch.chdir(tmp_path)
    docs = [{"text": row["body"]} for row in corpus_rows(600)]
    (tmp_path / "my.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "loop.yaml").write_text(blocks["yaml"].replace("../shared/data", str(data_mirror)))
    for line in blocks["bash"].strip().splitlines():
        command = shlex.split(line)
        assert command[0] == "ifguide" and main(command[1:]) == 0, line
    scope: dict = {}
    exec(compile(blocks["python"].replace("../shared/data", str(data_mirror)), "README.md", "exec"),
         scope)  # noqa: S102
    assert scope["trainer"].state.global_step == 2

    suppressed = set()  # (document, start, end) of each token whose prediction the script penalises
    for feature in scope["features"]:
        flags = scope["trainer"].data_collator([feature])["suppress"][0]
        suppressed |= {(feature["doc_id"], s, e) for (s, e), f in zip(feature["offset_mapping"][1:], flags)
                       if f}
    run = Run(tmp_path / "runs" / "loop")
    table = load_documents(run.data())
    texts = table["text"]
    identity = [document_id(s, i, x) for s, i, x in zip(table["source"], table["source_index"], texts)]
    blocks_ds = load_blocks(run.data())
    doc_ids, starts, ends = (np.concatenate(blocks_ds[c]) for c in ("doc_ids", "char_start", "char_end"))
    sparse = np.load(run.mask("words") / "marked.npz")
    # the token predicted
    predicted = sparse["blocks"] * len(blocks_ds[0]["input_ids"]) + sparse["positions"] + 1
    predicted = predicted[predicted < len(doc_ids)]
    penalised = {(identity[doc_ids[k]], starts[k], ends[k]) for k in predicted}
    first = {k for k in predicted if k == 0 or doc_ids[k - 1] != doc_ids[k]}
    stream_only = {(identity[doc_ids[k]], starts[k], ends[k]) for k in predicted
                   if k in first or starts[k] == len(texts[doc_ids[k]])}  # a first token, or end-of-text
    assert suppressed and suppressed <= penalised
    assert penalised - suppressed <= stream_only


@pytest.mark.parametrize("body, message", [
    ('{"doc_id": "x", "spans": [[0, 1e20]]}', "spans must be"),  # a float, however large
    ('{"doc_id": "x", "spans": [[0, Infinity]]}', "spans must be"),
    ('{"doc_id": "x", "spans": [[0, 100000000000000000000]]}', "spans must be"),  # an integer past int32
    ('{"doc_id": "x", "spans": [[-1, 3]]}', "spans must be"),  # negative
    ('{"doc_id": "x", "spans": [[5, 3]]}', "start < end"),  # reversed
    ('{"doc_id": "x", "spans": [[1, 2]], "spared": [[1, 2, 2, 2]]}', "k < n"),
    ('{"doc_id": "x", "spans": [[1, 2]], "source": 7}', '"source" must be a string'),
    ('{"ifguide_spans": 1, "metadata": [1]}\n{"doc_id": "x", "spans": [[1, 2]]}',
     '"metadata" must be an object'),
    ('{"ifguide_spans": 1, "metadata": {}}', "holds no document"),  # header only
    ("", "holds no document"),  # 0 bytes
    ('{"ifguide_spans": 1, "metadata": {"documents": 2}}\n{"doc_id": "x", "spans": [[1, 2]]}', "cut short"),
    ("[" * 100000 + "]" * 100000, "is not JSON"),  # nesting deep enough to exhaust the parser
])
def test_untrusted_span_files_fail_in_one_line(tmp_path, body, message):
    (tmp_path / "bad.jsonl").write_text(body + "\n" if body else "")
    with pytest.raises(IfguideError, match=message):
        SpanMask.load(tmp_path / "bad.jsonl")


def test_a_byte_order_mark_and_a_matching_count_load(tmp_path):
    text = '{"ifguide_spans": 1, "metadata": {"documents": 1}}\n{"doc_id": "x", "spans": [[1, 2], [0, 1]]}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert SpanMask.load(tmp_path / "bom.jsonl").spans["x"].tolist() == [[0, 2]]


def test_interval_arithmetic_of_import_matches_character_sets():
    from ifguide.selection.transfer import _covered, _merged, _overlap, _visible

    rng = np.random.default_rng(0)
    chars = lambda intervals: {c for a, b in intervals for c in range(a, b)}  # noqa: E731
    for _ in range(200):
        a = np.sort(rng.integers(0, 60, size=(rng.integers(0, 6), 2)), axis=1)
        b = np.sort(rng.integers(0, 60, size=(rng.integers(0, 6), 2)), axis=1)
        assert chars(_merged(a)) == chars(a) and np.all(_merged(a)[1:, 0] > _merged(a)[:-1, 1] - 1)
        assert _overlap(_merged(a), _merged(b)) == len(chars(a) & chars(b))
        text = "".join(rng.choice(list("ab \n\t")) for _ in range(50))
        # spans end at most one past the text (its end-of-text character)
        inside = a[a[:, 1] <= len(text) + 1]
        visible = {c for c in chars(inside) if c >= len(text) or not text[c].isspace()}
        assert chars(_visible(text, inside)) == visible
        offsets, docs = b, rng.integers(0, 2, size=len(b))
        content = {0: _visible(text, a[a[:, 1] <= 51]), 1: _visible(text, a[a[:, 1] <= 51])}
        assert _covered(offsets, docs, content) == sum(
            len(chars(content[d]) & chars(offsets[docs == d])) for d in set(docs.tolist()))
    assert _visible("a b", np.array([[0, 4]])).tolist() == [[0, 1], [2, 4]]  # 'a', then 'b' and end-of-text
