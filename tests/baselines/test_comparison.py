"""The comparison methods and sets: RAD against plain sampling and from-scratch rewards, DPO pairs and loss,
LAMBADA by hand, AttaQ / LAMBADA checksums, and the comparison report."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import GPT2TokenizerFast

import ifguide.evaluation.stage as evaluation
from ifguide.baselines.rad import RewardAugmentedLogits
from ifguide.config import load_config
from ifguide.data import corpora
from ifguide.errors import IfguideError
from ifguide.evaluation.lambada import greedy_matches, lambada_cases
from ifguide.evaluation.stage import evaluate
from ifguide.names import eval_name
from ifguide.toxicity import scorers
from ifguide.toxicity.reward import build_reward_model, prefix_loss, text_toxicity
from tests.conftest import micro_model

VOCAB = 64


def _reward_model(seed: int = 0):
    cfg = load_config("quick")
    return build_reward_model(dataclasses.replace(cfg, seed=seed), VOCAB, pad_id=0).eval()


def _sample(model, processors, top_k: int, seed: int = 3) -> torch.Tensor:
    prompt = torch.tensor([[5, 9, 11, 2], [7, 7, 3, 1]])
    torch.manual_seed(seed)
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.9,
                          top_k=top_k, max_new_tokens=10, num_return_sequences=6, pad_token_id=0,
                          logits_processor=processors)


def test_rad_with_beta_zero_is_top_k_sampling():
    model = micro_model(VOCAB, block=32).eval()
    rad = _sample(model, [RewardAugmentedLogits(_reward_model(), top_k=20, beta=0.0)], top_k=0)
    plain = _sample(model, None, top_k=20)
    assert torch.equal(rad, plain)
    assert not torch.equal(plain, _sample(model, None, top_k=20, seed=4))  # the comparison can fail


def _last_token_reward_model(toxic_token: int):
    """A reward model whose toxicity is that of the last token alone: high for `toxic_token`, low for the
    rest."""
    model = _reward_model()
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.dense.weight.zero_()
            layer.attention.dense.bias.zero_()
            layer.mlp.dense_4h_to_h.weight.zero_()
            layer.mlp.dense_4h_to_h.bias.zero_()
        direction = torch.randn(model.config.hidden_size)
        embeddings = model.gpt_neox.embed_in.weight
        embeddings.copy_(-direction.expand_as(embeddings))
        embeddings[toxic_token] = direction
        normalised = torch.nn.functional.layer_norm(direction, direction.shape)
        model.classifier.weight.copy_(normalised[None] / normalised.norm() * 20)
        model.classifier.bias.zero_()
    return model


def test_rad_with_large_beta_never_picks_a_toxic_token():
    model = micro_model(VOCAB, block=32).eval()
    plain = _sample(model, None, top_k=20)[:, 4:]
    toxic = int(torch.bincount(plain.flatten(), minlength=VOCAB).argmax())  # the model's favourite token
    reward_model = _last_token_reward_model(toxic)
    scored = text_toxicity(reward_model, [[1, 2, toxic], [toxic, 2, 1]], pad_id=0)
    assert scored[0] > 0.99 > 0.01 > scored[1]
    assert (plain == toxic).sum() >= 5
    for seed in range(3):
        rad = _sample(model, [RewardAugmentedLogits(reward_model, top_k=20, beta=50.0)], top_k=0, seed=seed)
        assert not (rad[:, 4:] == toxic).any()


def test_rad_incremental_reward_equals_scoring_from_scratch():
    reward_model = _reward_model(seed=1)
    processor = RewardAugmentedLogits(reward_model, top_k=5, beta=2.0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 4), generator=generator)
    for _ in range(5):
        out = processor(ids, torch.randn(3, VOCAB, generator=generator))
        assert torch.isfinite(out).sum(dim=1).eq(5).all()
        continuation = ids[:, 4:].tolist()
        for row in range(3):
            candidates = processor.candidates[row].tolist()
            scratch = text_toxicity(reward_model, [continuation[row] + [c] for c in candidates], pad_id=0)
            np.testing.assert_allclose(processor.toxicity[row].numpy(), scratch, atol=1e-5)
        pick = torch.multinomial(torch.softmax(out, dim=1), 1, generator=generator)
        ids = torch.cat([ids, pick], dim=1)


def test_prefix_loss_weights_later_prefixes_more():
    logits = torch.zeros(1, 3, 1)
    logits[0, 2, 0] = 5.0  # confident "toxic" at the last position only
    mask = torch.tensor([[1, 1, 1]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (1 * bce(torch.tensor(0.0), torch.tensor(1.0)) + 2 * bce(torch.tensor(0.0), torch.tensor(1.0))
                + 3 * bce(torch.tensor(5.0), torch.tensor(1.0))) / 6
    assert float(prefix_loss(logits, mask, torch.tensor([1]))) == pytest.approx(float(expected))


class NextTokenModel(torch.nn.Module):
    """Predicts token + 1 after every token: logits one-hot on input_ids + 1."""

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.nn.functional.one_hot((input_ids + 1) % 50, 50).float()})


def test_lambada_accuracy_by_hand():
    cases = [([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 6]), ([9], [10]), ([7, 8, 9, 10, 11, 12], [13, 14])]
    assert greedy_matches(NextTokenModel(), cases, max_tokens=64, pad_id=0, batch_size=3).tolist() == [
        True, False, True, True]
    # a context cut from the left still predicts the same last word here; a two-token window cannot hold it
    assert greedy_matches(NextTokenModel(), cases[3:], max_tokens=3, pad_id=0).tolist() == [True]
    tok = GPT2TokenizerFast.from_pretrained(str(corpora.source_path("tokenizers/gpt2/vocab.json").parent))
    words, tokens = lambada_cases(tok, ["the cat sat on the doormat"])
    assert words[0] == (tok("the cat sat on the")["input_ids"], tok(" doormat")["input_ids"])
    full = tok("the cat sat on the doormat")["input_ids"]
    assert tokens[0] == (full[:-1], full[-1:]) and len(words[0][1]) > 1  # "doormat" is two BPE tokens


@pytest.mark.parametrize("name, reader", [("attaq/attaq_dataset.csv", corpora.attaq_questions),
                                          ("lambada/lambada_test.jsonl", corpora.lambada_passages)])
def test_attaq_and_lambada_reject_a_wrong_checksum(tmp_path, monkeypatch, data_mirror, name, reader):
    assert len(reader()) in (1402, 5153)
    copy = tmp_path / name
    copy.parent.mkdir(parents=True)
    shutil.copy(data_mirror / name, copy)
    copy.write_bytes(copy.read_bytes().replace(b"e", b"a", 1))
    monkeypatch.setenv("IFGUIDE_DATA", str(tmp_path))
    with pytest.raises(IfguideError, match=f"corrupted.*{name.split('/')[1]}"):
        reader()


def test_dpo_pairs_keep_the_prompt_tokens_that_generation_saw(quick_run):
    from ifguide.baselines.dpo import tokenized_pairs
    from ifguide.data.tokenizer import load_tokenizer

    tok = load_tokenizer(quick_run.data())

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # a prompt that ends inside a word the tokenizer holds whole: the word's halves merge across the boundary
    word = next(w for w in (tok.decode([i]) for i in range(len(tok))) if w.startswith(" ") and len(w) >= 6
                and len(ids(w)) == 1 and len(ids(w[:3])) == 1)
    prompt, chosen, rejected = "It was" + word[:3], word[3:] + " a day", word[3:] + " not"
    assert ids(prompt + chosen)[: len(ids(prompt))] != ids(prompt)  # why tokenizing the joined text is wrong
    pairs = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}, {"prompt": "x", "chosen": "y",
                                                                        "rejected": "z"}]
    rows = tokenized_pairs(tok, pairs, max_prompt_tokens=16)
    assert rows[0] == {"prompt_ids": ids(prompt), "chosen_ids": ids(chosen) + [tok.eos_token_id],
                       "rejected_ids": ids(rejected) + [tok.eos_token_id]}
    assert rows[1]["prompt_ids"] == ids("x")
    assert tokenized_pairs(tok, pairs, max_prompt_tokens=2)[0]["prompt_ids"] == ids(prompt)[-2:]


@pytest.mark.slow
def test_dpo_pairs_come_from_the_training_scorer_and_the_loss_decreases(quick_run, monkeypatch, capsys):
    from ifguide.baselines import dpo
    from ifguide.baselines.dpo import load_pairs, preference_pairs, preference_prompts, train_dpo
    from ifguide.data.tokenizer import load_tokenizer
    from ifguide.evaluation.results import report
    from ifguide.toxicity.reward import load_reward_model, train_reward_model

    cfg = quick_run.load_config()
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, epochs=0.3))
    train_reward_model(cfg, quick_run)
    with pytest.raises(IfguideError, match="training-time scorer"):
        train_dpo(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scorers=["reward-model"])),
                  quick_run, "dpo", "baseline")

    def no_evaluation_scorer(*args, **kwargs):
        raise AssertionError("an evaluation scorer was used to build DPO pairs")

    monkeypatch.setattr(scorers, "get_scorer", no_evaluation_scorer)
    monkeypatch.setattr(evaluation, "get_scorer", no_evaluation_scorer)
    monkeypatch.setattr(scorers, "SCORERS", {})
    train_dpo(cfg, quick_run, "dpo", "baseline", seed=0)
    monkeypatch.undo()
    check_an_interrupted_dpo_resumes(cfg, quick_run, monkeypatch, capsys)

    pairs = load_pairs(quick_run.preferences("baseline"))
    tok, (reward_model, _) = load_tokenizer(quick_run.data()), load_reward_model(quick_run)
    assert len(pairs) >= 20
    for side in ("chosen", "rejected"):
        ids = [x[: cfg.reward.max_tokens] for x in tok([p[side] for p in pairs],
                                                       add_special_tokens=False)["input_ids"]]
        np.testing.assert_allclose(text_toxicity(reward_model, ids, tok.pad_token_id),
                                   [p[f"{side}_toxicity"] for p in pairs], atol=1e-5)
    assert all(p["rejected_toxicity"] - p["chosen_toxicity"] >= cfg.dpo.min_margin for p in pairs)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the pairs were sampled again")

    monkeypatch.setattr(dpo, "generate", no_sampling)  # another evaluation scorer keeps the stored pairs ...
    preference_pairs(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scorers=["jigsaw-lstm"])),
                     quick_run, "baseline")
    with pytest.raises(IfguideError, match="top_p changed"):  # ... another sampling setting does not
        preference_pairs(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, top_p=0.8)), quick_run,
                         "baseline")
    monkeypatch.undo()
    rows = [json.loads(line)
            for line in (quick_run.data() / "prompts" / "rtp.jsonl").read_text().splitlines()]
    assert not set(preference_prompts(quick_run)) & {r["prompt"] for r in rows}
    info = json.loads((quick_run.model("dpo") / "info.json").read_text())
    assert info["dpo_loss_last"] < info["dpo_loss_first"] - 0.01

    for model, decoding in (("baseline", "sample"), ("baseline", "rad"), ("dpo", "sample")):
        evaluate(cfg, quick_run, model, "rtp", decoding=decoding)
    evaluate(cfg, quick_run, "baseline", "lambada")
    text = report(quick_run)
    assert eval_name("baseline-s3", "rad") == "rad-s3" and eval_name("ifguide-s0", "rad") == "ifguide+rad-s0"
    table = text.split("# RealToxicityPrompts: comparison")[1]
    assert "| rad | 1 |" in table and "| n/a | n/a | n/a |" in table and "| dpo | 1 |" in table
    accuracy = json.loads((quick_run.eval("baseline", "lambada") / "results.json").read_text())["lambada"]
    assert f"{accuracy['last_word']:.1%} / {accuracy['last_token']:.1%}" in table


def check_an_interrupted_dpo_resumes(cfg, run, monkeypatch, capsys):
    """A DPO fine-tuning stopped right after its step-4 checkpoint resumes there and ends with the weights of
    the uninterrupted run."""
    from safetensors.torch import load_file

    from ifguide.baselines.dpo import train_dpo
    from ifguide.training.stage import CarriedProgress

    save = CarriedProgress.on_save  # the last write of a checkpoint

    def save_then_stop(self, args, state, control, **kwargs):
        save(self, args, state, control, **kwargs)
        if state.global_step >= 4:
            raise KeyboardInterrupt

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=2))
    monkeypatch.setattr(CarriedProgress, "on_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg, run, "dpo-cut", "baseline", seed=0)
    monkeypatch.undo()
    assert (run.root / "models" / ".dpo-cut.partial" / "resume" / "checkpoints" / "checkpoint-4").is_dir()
    capsys.readouterr()
    train_dpo(cfg, run, "dpo-cut", "baseline", seed=0)
    assert "dpo dpo-cut: resuming from step 4" in capsys.readouterr().out
    whole, cut = (load_file(run.model(name) / "model.safetensors") for name in ("dpo", "dpo-cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not (run.root / "models" / ".dpo-cut.partial").exists()
    shutil.rmtree(run.model("dpo-cut"))  # the shared run keeps only the models its other tests expect
