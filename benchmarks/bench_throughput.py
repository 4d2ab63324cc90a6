"""Throughput of training, sampling and scoring on the demo's model and shapes, each against a minimal
reference measured side by side in the same process (the machine's speed drifts; only ratios compare).

- training: tokens/s and FLOP/s (6 per non-embedding parameter and token) of the step `ifguide train` runs
  (SuppressionTrainer), against a minimal PyTorch loop with the same model, batch and AdamW, and against
  torch.mm at the model's shapes and at 1024², fp32 and bf16;
- the loss's value checks (a host sync per step) on and off, and bf16 autocast, in the minimal loop;
- sampling: tokens/s of the eval's sampler (model.generate) against transformers' `generate` (the previous
  path), a minimal hand-written sampler (KV cache, sort-based top-p, multinomial) and itself under bf16
  autocast;
- scoring: tokens/s of each toxicity scorer on 5,000 continuations; the BiLSTM scorers also against running
  the padding every row starts with once per row.

Needs a run with a baseline: `ifguide prepare --config demo --run R && ifguide train --run R --name baseline`.
One thread, as in the demo's workers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import DynamicCache, PrinterCallback, TrainingArguments

from ifguide.artifacts import Run
from ifguide.data import BlockDataset, block_array, load_tokenizer, read_jsonl
from ifguide.model import generate, load_model
from ifguide.toxicity import get_scorer
from ifguide.toxicity.scorers import KerasBiLSTM
from ifguide.training import SuppressionTrainer, suppression_loss


def timed(fn, repeats: int = 3) -> float:
    """The median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> float:
    """GFLOP/s of torch.mm, the best over `shapes` (m, k, n)."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = max(best, 2 * m * k * n / timed(lambda a=a, b=b: torch.mm(a, b), 10) / 1e9)
    return best


def training(run: Run, model_name: str, steps: int) -> None:
    cfg = run.load_config()
    blocks = block_array(run)[: steps * cfg.train.batch_size]
    model = load_model(run.model(model_name)).train()
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    flop_per_token = 6 * (sum(p.numel() for p in model.parameters()) - embeddings)
    tokens = steps * cfg.train.batch_size * cfg.data.block_size

    def ifguide_step() -> None:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
                                     learning_rate=cfg.train.lr, report_to="none", use_cpu=True,
                                     save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                     remove_unused_columns=False, dataloader_num_workers=0)
            trainer = SuppressionTrainer(model=model, args=args, train_dataset=BlockDataset(blocks, None, ()),
                                         lam=1.0)
            trainer.remove_callback(PrinterCallback)  # no end-of-training dictionary between the lines
            trainer.train()

    def minimal_loop(check_values: bool = False, bf16: bool = False) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        for start in range(0, len(blocks), cfg.train.batch_size):
            ids = torch.as_tensor(np.asarray(blocks[start: start + cfg.train.batch_size], dtype=np.int64))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            loss = suppression_loss(logits, ids, None, 1.0, check_values=check_values)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the Trainer does (max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    ours = tokens / timed(ifguide_step, 2)
    plain = tokens / timed(minimal_loop, 2)
    checked = tokens / timed(lambda: minimal_loop(check_values=True), 2)
    bf16 = tokens / timed(lambda: minimal_loop(bf16=True), 2)
    d, f = model.config.hidden_size, model.config.intermediate_size
    rows = cfg.train.batch_size * cfg.data.block_size
    shapes = [(rows, d, 3 * d), (rows, d, f), (rows, f, d)]
    print(f"training ({steps} steps of {cfg.train.batch_size} x {cfg.data.block_size} tokens)")
    print(f"  ifguide train step : {ours:9,.0f} tokens/s, {ours * flop_per_token / 1e9:5.1f} GFLOP/s")
    print(f"  minimal loop       : {plain:9,.0f} tokens/s   ratio {ours / plain:.2f}")
    print(f"  loss value checks  : {checked:9,.0f} tokens/s with them   ratio {checked / plain:.3f}")
    print(f"  bf16 autocast      : {bf16:9,.0f} tokens/s in the minimal loop   ratio {bf16 / plain:.2f}")
    for dtype in (torch.float32, torch.bfloat16):
        peak, square = matmul_peak(shapes, dtype), matmul_peak([(1024, 1024, 1024)], dtype)
        print(f"  torch.mm {str(dtype)[6:]:8}: {peak:5.1f} GFLOP/s at the model's shapes, "
              f"{square:5.1f} at 1024²")


def minimal_sampler(model, ids: torch.Tensor, mask: torch.Tensor, copies: int, top_p: float,
                    new_tokens: int) -> torch.Tensor:
    """The textbook sampler: prompt repeated per copy, DynamicCache, full sort for top-p, multinomial."""
    ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, out = DynamicCache(), []
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   cache=cache).logits[:, -1]
    position = positions[:, -1:]
    for _ in range(new_tokens):
        probs, order = torch.sort(torch.softmax(logits.float(), -1), descending=True)
        probs[(probs.cumsum(-1) - probs) >= top_p] = 0
        token = order.gather(1, torch.multinomial(probs, 1))
        out.append(token)
        mask, position = torch.cat([mask, torch.ones_like(token)], 1), position + 1
        logits = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                       cache=cache).logits[:, -1]
    return torch.cat(out, 1)


@torch.no_grad()
def sampling(run: Run, model_name: str, prompts: int) -> list[str]:
    cfg = run.load_config()
    ecfg = cfg.eval
    model, tok = load_model(run.model(model_name)), load_tokenizer(run.data())
    texts = [r["prompt"] for r in read_jsonl(run.data() / "prompts" / "rtp.jsonl")][:prompts]
    max_prompt = cfg.data.block_size - ecfg.max_new_tokens
    tokens = len(texts) * ecfg.num_samples * ecfg.max_new_tokens
    tok.padding_side, tok.truncation_side = "left", "left"
    batches = [tok(texts[i: i + ecfg.prompt_batch_size], return_tensors="pt", padding=True, truncation=True,
                   max_length=max_prompt) for i in range(0, len(texts), ecfg.prompt_batch_size)]
    samples: list[list[str]] = []

    def ours() -> None:
        samples[:] = generate(model, tok, texts, ecfg, max_prompt)

    def ours_bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generate(model, tok, texts, ecfg, max_prompt)

    def transformers_generate() -> None:
        for enc in batches:
            model.generate(**{k: v.repeat_interleave(ecfg.num_samples, 0) for k, v in enc.items()},
                           do_sample=True, top_p=ecfg.top_p, top_k=ecfg.top_k,
                           max_new_tokens=ecfg.max_new_tokens, pad_token_id=tok.eos_token_id)

    def minimal() -> None:
        for enc in batches:
            minimal_sampler(model, enc["input_ids"], enc["attention_mask"], ecfg.num_samples, ecfg.top_p,
                            ecfg.max_new_tokens)

    rates = {name: tokens / timed(fn, 1) for name, fn in
             (("ifguide", ours), ("transformers generate", transformers_generate), ("minimal", minimal),
              ("ifguide, bf16 autocast", ours_bf16))}
    print(f"sampling ({len(texts)} prompts x {ecfg.num_samples} samples x {ecfg.max_new_tokens} tokens, "
          f"batches of {ecfg.prompt_batch_size} prompts)")
    for name, rate in rates.items():
        print(f"  {name:22}: {rate:9,.0f} tokens/s   ifguide / this {rates['ifguide'] / rate:.2f}")
    return [text for group in samples for text in group]


def scoring(continuations: list[str], scorers: list[str]) -> None:
    texts = (continuations * (5000 // max(len(continuations), 1) + 1))[:5000]
    words = sum(len(t.split()) for t in texts)
    print(f"scoring (5,000 continuations, {words:,} words)")
    for name in scorers:
        scorer = get_scorer(name)
        rate = 5000 / timed(lambda s=scorer: s.score(texts), 1)
        line = f"  {name:22}: {rate:9,.0f} texts/s"
        if isinstance(scorer, KerasBiLSTM):  # against its forward LSTM run over every row's padding too
            every_step = get_scorer(name)
            every_step._forward_lstm = lambda x, weights, shared, s=every_step: s._lstm(x, *weights,
                                                                                        reverse=False)[0]
            reference = 5000 / timed(lambda s=every_step: s.score(texts), 1)
            line += f" ({rate / reference:.2f}x running the shared padding for every row: {reference:,.0f})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--model", default="baseline-s0")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timing")
    parser.add_argument("--prompts", type=int, default=40, help="RTP prompts per sampling timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Run(args.run)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"bf16 in hardware (oneDNN): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, 1 thread; "
          "ifguide runs fp32 throughout")
    training(run, args.model, args.steps)
    continuations = sampling(run, args.model, args.prompts)
    scoring(continuations, run.load_config().eval.scorers)


if __name__ == "__main__":
    main()
