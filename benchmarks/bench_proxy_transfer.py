"""The proxy across tokenizers: a mask selected under one run's tokenizer trains a model under another
tokenizer.

Needs a source run with the mask and its models evaluated on RTP (`make demo`: runs/demo, mask `ifguide-self`,
scored under the demo's trained BPE). Builds a target run from the same config with another tokenizer (the
mirror's GPT-NeoX BPE by default), exports the mask as character spans, imports it there, trains the target's
baseline and masked models for each seed and evaluates them on RTP. Prints the selection metrics before and
after the transfer and the downstream toxicity next to the same-tokenizer result of the source run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from ifguide.artifacts import Run, read_info
from ifguide.cli import main as ifguide
from ifguide.config import config_to_dict


def run_command(*args: str) -> None:
    if ifguide(list(args)) != 0:
        raise SystemExit(f"ifguide {' '.join(args)} failed")


def results(run: Run, model: str) -> dict:
    return json.loads((run.eval(model, "rtp") / "results.json").read_text())


def toxicity_row(run: Run, mask: str, seeds: list[int], scorer: str) -> dict:
    """Seed-averaged EMT and share >= 0.5 of the baseline and the masked model, and held-out perplexity."""
    row = {}
    for model in ("baseline", mask):
        per_seed = [results(run, f"{model}-s{seed}") for seed in seeds]
        row[model] = {k: sum(r["scorers"][scorer]["all"][k] for r in per_seed) / len(seeds)
                      for k in ("emt", "share")}
        row[model]["ppl"] = sum(r["perplexity"]["heldout"] for r in per_seed) / len(seeds)
    return row


def quality_line(info: dict) -> str:
    q = info["quality"]
    # needs scores
    enrichment = f"enrichment {q['target_enrichment']:.1f}x, " if "target_enrichment" in q else ""
    return (f"label precision {q['label_precision']:.1%}, {enrichment}coverage {q['coverage']:.1%}, "
            f"marked {info['marked_tokens']:,} tokens ({info['marked_share']:.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo", help="source run: the mask's tokenizer and its models")
    parser.add_argument("--mask", default="ifguide-self")
    parser.add_argument("--target", default="runs/demo-neox")
    parser.add_argument("--tokenizer", default=os.path.join(os.environ.get("IFGUIDE_DATA", "../shared/data"),
                                                            "tokenizers", "neox-20b", "tokenizer.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    source, target = Run(args.run), Run(args.target)
    values = config_to_dict(source.load_config())
    values["data"]["tokenizer"] = str(Path(args.tokenizer).resolve())
    target.root.mkdir(parents=True, exist_ok=True)
    config = target.root.parent / f"{target.root.name}.yaml"
    config.write_text(yaml.safe_dump(values))
    spans = target.root.parent / f"{target.root.name}-{args.mask}.spans.jsonl"

    run_command("prepare", "--config", str(config), "--run", str(target.root))
    if not spans.exists():
        run_command("export-mask", "--run", str(source.root), "--mask", args.mask, "--out", str(spans))
    run_command("import-mask", "--run", str(target.root), "--spans", str(spans), "--name", args.mask)
    for seed in args.seeds:
        run_command("train", "--run", str(target.root), "--name", f"baseline-s{seed}", "--seed", str(seed))
        run_command("train", "--run", str(target.root), "--name", f"{args.mask}-s{seed}", "--seed", str(seed),
                    "--mask", args.mask)
        for model in (f"baseline-s{seed}", f"{args.mask}-s{seed}"):
            run_command("eval", "--run", str(target.root), "--model", model, "--prompts", "rtp")

    imported = read_info(target.mask(args.mask))
    transfer = imported["transfer"]
    labeller = imported.get("labeller")
    print(f"\nmask {args.mask}, labelled by {labeller}; seeds {args.seeds}")
    print(f"- selected under {args.run}'s tokenizer: {quality_line(read_info(source.mask(args.mask)))}")
    print(f"- imported under {Path(args.tokenizer).parent.name}: {quality_line(imported)}")
    print(f"- transfer: {transfer['documents_not_found_share']:.1%} of documents not found, "
          f"{transfer['characters_kept_share']:.1%} of suppressed characters kept, "
          f"{transfer['marked_tokens']:,} tokens marked against "
          f"{transfer['file_exported_tokens']:,} exported")
    scorers = [s for s in results(target, f"baseline-s{args.seeds[0]}")["scorers"] if s != labeller]
    print("\n| tokenizer | scorer | baseline EMT | masked EMT | EMT reduction | share >= 0.5 | "
          "held-out ppl change |")
    print("|---|---|---|---|---|---|---|")
    for name, run in ((f"{args.run} (same tokenizer)", source), (f"{args.target} (imported)", target)):
        for scorer in scorers:
            row = toxicity_row(run, args.mask, args.seeds, scorer)
            base, ours = row["baseline"], row[args.mask]
            print(f"| {name} | {scorer} | {base['emt']:.3f} | {ours['emt']:.3f} | "
                  f"{base['emt'] / ours['emt']:.2f}x | {base['share']:.1%} -> {ours['share']:.1%} | "
                  f"{ours['ppl'] / base['ppl'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
