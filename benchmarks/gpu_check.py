"""The CUDA path, checked on a bare GPU machine in one command (README, "GPU check"); one summary line per
check.

1. pipeline   the quick preset end to end on the GPU: prepare, train, factors, scores (paper queries),
              select, train with the mask, eval (RTP, profanity-check), each an `ifguide` command with its
              exit status and time;
2. scores     loss-term scores of the same blocks from the run's model and P on the GPU and on the CPU
              (float32, TF32 off): their largest difference relative to the largest score must stay under
              --tolerance;
3. throughput one Pythia-160M-shaped model (12 layers, d 768, vocab 50,304), bf16 autocast as the paper
              trained it: training tokens/s (forward, backward, AdamW) against loss-term scoring tokens/s
              (float32 as `ifguide scores` runs, every block module tracked, a random P), interleaved, best
              of --repeats; the ratio is our performance goal's.

Without a GPU it runs on the CPU with `--small` (a smoke test of the script itself; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# The mirror files the quick run reads (traced), by prefix: what `make gpu-bundle` copies.
QUICK_MIRROR = ("attaq/", "blocklists/", "bold/", "davidson/", "lambada/", "nltk/brown.zip", "rtp/",
                "text/tinyshakespeare.txt", "toxigen/demonstrations/", "toxigen/prompts/",
                "wikitext2/test.txt")


def bundle_data(mirror: Path, out: Path) -> None:
    """Copy the manifest and the quick run's mirror files to `out` (a mirror the GPU machine can read)."""
    from ifguide.data.sources import registry

    names = [name for name in registry() if name.startswith(QUICK_MIRROR)]
    for name in ["MANIFEST.json", *names]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(mirror / name, out / name)
    size = sum((out / name).stat().st_size for name in names)
    print(f"gpu-check: {len(names)} mirror files ({size / 2**20:.1f} MiB) in {out}")


def line(check: str, ok: bool, text: str) -> bool:
    print(f"gpu-check {check:10s} {'PASS' if ok else 'FAIL'}  {text}", flush=True)
    return ok


def pipeline(run: Path) -> tuple[bool, float]:
    """The quick preset's stages as CLI commands; stops at the first failure."""
    from ifguide.cli import main

    r = ["--run", str(run)]
    steps = [["prepare", "--config", "quick", *r], ["train", "--name", "baseline", *r],
             ["factors", "--model", "baseline", *r],
             ["scores", "--model", "baseline", "--queries", "rtp", "--no-include-head", *r],
             ["select", "--scores", "baseline/toxic-minus-nontoxic", "--name", "ifguide", *r],
             ["train", "--name", "ifguide", "--mask", "ifguide", *r],
             ["eval", "--model", "ifguide", "--scorer", "profanity-check", *r]]
    start, timings = time.perf_counter(), []
    for argv in steps:
        t = time.perf_counter()
        code = main(argv)
        timings.append(f"{argv[0]} {time.perf_counter() - t:.0f}s")
        if code != 0:
            line("pipeline", False, f"`ifguide {' '.join(argv)}` exited {code}; " + ", ".join(timings))
            return False, time.perf_counter() - start
    return line("pipeline", True, ", ".join(timings)), time.perf_counter() - start


def scores_agree(run: Path, device: torch.device, tolerance: float, blocks: int = 64) -> bool:
    """Loss-term scores of the first blocks on `device` against the CPU, from the run's model and
    direction."""
    import numpy as np

    from ifguide.artifacts import Run, load_tensors
    from ifguide.data.blocks import block_array
    from ifguide.influence import LossTermScorer
    from ifguide.influence.direction import DIRECTION_FILE
    from ifguide.influence.stage import analysis_model

    r = Run(run)
    ids = torch.from_numpy(np.array(block_array(r)[:blocks], dtype=np.int64))
    direction = load_tensors(r.direction("baseline", "toxic-minus-nontoxic"), DIRECTION_FILE)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for where in (torch.device("cpu"), device):
        model = analysis_model(r, "baseline").to(where)
        scorer = LossTermScorer(model, {k: v.to(where) for k, v in direction.items()})
        out[where.type] = torch.cat([scorer(ids[i: i + 16].to(where)).cpu() for i in range(0, blocks, 16)])
    diff = (out[device.type] - out["cpu"]).abs().max().item() / out["cpu"].abs().max().item()
    return line("scores", diff <= tolerance, f"{device.type} vs cpu on {blocks} blocks: max |diff| / max "
                                             f"|score| = {diff:.2e} (tolerance {tolerance:g})")


def throughput(device: torch.device, small: bool, repeats: int) -> bool:
    """Training against loss-term scoring tokens/s of a Pythia-160M-shaped model."""
    from ifguide.config import ModelConfig
    from ifguide.influence import LossTermScorer, discover_tracked_modules
    from ifguide.model import build_model

    shape = dict(n_layer=2, n_head=2, d_model=64, d_ff=256) if small else \
        dict(n_layer=12, n_head=12, d_model=768, d_ff=3072)
    vocab, block, batch = (1024, 64, 4) if small else (50304, 1024, 8)
    model = build_model(ModelConfig(arch="gpt_neox", **shape), vocab, block, eos_id=0, seed=0).to(device)
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, block)).to(device)
    bf16 = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tracked = discover_tracked_modules(model)
    direction = {name: torch.randn(m.out_features, m.in_features + (m.bias is not None), device=device) * 1e-3
                 for name in tracked for m in [model.get_submodule(name)]}
    scoring_model = build_model(ModelConfig(arch="gpt_neox", **shape), vocab, block, eos_id=0,
                                seed=0).to(device)
    scorer = LossTermScorer(scoring_model, direction)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def score_step() -> None:  # float32, as `ifguide scores` runs
        scorer(ids)

    best = {"train": float("inf"), "score": float("inf")}
    for step in (train_step, score_step):  # warm-up (kernels, allocator)
        step()
    sync()
    for _ in range(repeats):  # interleaved: drift hits both alike
        for name, step in (("train", train_step), ("score", score_step)):
            t = time.perf_counter()
            for _ in range(3):
                step()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / 3)
    tokens = batch * block
    train_tps, score_tps = tokens / best["train"], tokens / best["score"]
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    model_name = "small" if small else "Pythia-160M-shaped"
    return line("throughput", True, f"{model_name} on {device.type}: train ({'bf16' if bf16 else 'fp32'}) "
                                    f"{train_tps:,.0f} tokens/s, score (fp32) {score_tps:,.0f} tokens/s, "
                                    f"scoring / training time per token {train_tps / score_tps:.2f}{memory}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("IFGUIDE_DATA"),
                        help="the data mirror (IFGUIDE_DATA)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a tiny throughput model (CPU smoke test)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pipeline", "scores", "throughput"])
    parser.add_argument("--bundle-data", type=Path,
                        help="only copy the quick run's mirror files to this folder")
    args = parser.parse_args()
    if not args.data or not (Path(args.data) / "MANIFEST.json").is_file():
        print("gpu-check: give the data mirror with --data DIR (or IFGUIDE_DATA)", file=sys.stderr)
        return 2
    os.environ["IFGUIDE_DATA"] = str(Path(args.data).resolve())
    if args.bundle_data:
        bundle_data(Path(args.data), args.bundle_data)
        return 0
    os.environ.setdefault("CI", "true")  # no progress bars in the log
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    results = [line("device", device.type == "cuda", f"{name}; torch {torch.__version__}")]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if "pipeline" not in args.skip:
            ok, _ = pipeline(run)
            results.append(ok)
            if ok and "scores" not in args.skip:
                results.append(scores_agree(run, device, args.tolerance))
    if "throughput" not in args.skip:
        results.append(throughput(device, args.small, args.repeats))
    print(f"gpu-check: {sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
