"""Benchmark: `ifguide prepare` on synthetic JSONL corpora of 10M and 100M tokens; prints tokens/s and peak
memory.

Each corpus is generated on the fly (Zipf-distributed words of the mirror's texts plus some blocklisted words,
documents of 50 to 1,500 words, some of them labelled toxic) into a temporary folder and prepared in a fresh
`ifguide prepare` process with a trained byte-level BPE (data.vocab_size 4096) and the default data.num_proc.
Peak memory is sampled every 0.5 s over the whole process tree (the prepare process and its tokenising
workers): PSS (shared pages split between the processes that map them, so the sum is the true footprint) and
the largest single RSS. Goals: peak <= 2 GB at 100M tokens, the same (+-20%) at 10M; >= 1M tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ifguide.data.corpora import blocklist
from ifguide.data.sources import source_path

CHARS_PER_TOKEN = 4.75  # measured on this generator with the trained 4096-entry BPE


def word_pool() -> np.ndarray:
    words = source_path("text/tinyshakespeare.txt").read_text().split()
    words += source_path("wikitext2/test.txt").read_text().split()
    return np.array(sorted(set(words)) + blocklist())


def write_corpus(path: Path, tokens: int, seed: int = 0) -> None:
    """JSONL documents of Zipf-ranked words until about `tokens` tokens are written."""
    rng = np.random.default_rng(seed)
    pool = word_pool()
    weights = 1.0 / np.arange(1, len(pool) + 1) ** 1.1
    rng.shuffle(weights)
    weights /= weights.sum()
    target_chars = tokens * CHARS_PER_TOKEN
    written = 0
    with open(path, "w") as handle:
        while written < target_chars:
            lengths = rng.integers(50, 1500, 1000)
            words = pool[rng.choice(len(pool), int(lengths.sum()), p=weights)]
            cuts = np.cumsum(lengths)[:-1]
            lines = []
            for n, doc in enumerate(np.split(words, cuts)):
                text = " ".join(doc.tolist())
                written += len(text)
                lines.append(json.dumps({"text": text, "toxic": bool(n % 7 == 0)}))
            handle.write("\n".join(lines) + "\n")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc/PID/task/TID/children (cheap: no scan of /proc)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                continue
    return tree


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) in bytes over `pid` and its descendants."""
    pss = rss = 0
    for p in descendants(pid):
        try:
            fields = dict(line.split(":", 1)
                          for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:])
        except OSError:
            continue
        pss += int(fields["Pss"].split()[0]) * 1024
        rss = max(rss, int(fields["Rss"].split()[0]) * 1024)
    return pss, rss


def run_prepare(corpus: Path, workdir: Path) -> dict:
    config = workdir / "config.yaml"
    config.write_text(f"base: quick\ndata:\n  sources: {{}}\n  vocab_size: 4096\n  block_size: 128\n"
                      f"  corpus:\n  - {{path: {corpus}, source: synthetic, label_field: toxic}}\n")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ifguide.cli", "prepare", "--config", str(config),
                             "--run", str(workdir / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "CI": "true"})
    peak = {"pss": 0, "rss": 0}

    def sample() -> None:
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    elapsed = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{output[-3000:]}")
    summary = json.loads((workdir / "run" / "data" / "info.json").read_text())["summary"]
    return {"tokens": summary["tokens"], "seconds": elapsed, **peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[10e6, 100e6],
                        help="corpus sizes in tokens")
    args = parser.parse_args()
    rows = []
    for size in args.tokens:
        with tempfile.TemporaryDirectory(prefix="ifguide-bench-prepare-") as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            start = time.perf_counter()
            write_corpus(corpus, int(size))
            print(f"generated {corpus.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - start:.0f}s; "
                  "preparing ...", flush=True)
            result = run_prepare(corpus, Path(tmp))
            rows.append(result)
            rate = result["tokens"] / result["seconds"] / 1e6
            print(f"{result['tokens'] / 1e6:6.1f}M tokens: {result['seconds']:6.1f}s, {rate:.2f}M tokens/s, "
                  f"peak PSS {result['pss'] / 2**30:.2f} GiB (largest process RSS "
                  f"{result['rss'] / 2**30:.2f} GiB)",
                  flush=True)
    print("\n| corpus tokens | seconds | tokens/s | peak PSS (tree) | largest RSS |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens'] / 1e6:.1f}M | {r['seconds']:.0f} | {r['tokens'] / r['seconds'] / 1e6:.2f}M | "
              f"{r['pss'] / 2**30:.2f} GiB | {r['rss'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
