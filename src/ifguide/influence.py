"""Stage 3 (`ifguide factors`, `ifguide scores`): EK-FAC factors and differential per-token scores.

Per-token score definition (Kronfluence, `compute_per_token_scores=True`): for training block i,
S[i, t] = sum over tracked Linear modules m of  < P_m , g_{m,t} a_{m,t}^T >,
where P_m is the EK-FAC-preconditioned query gradient of module m, a_{m,t} the module's input at
position t (with a 1 appended for the bias) and g_{m,t} the gradient of the block's *summed*
training loss with respect to the module's output at position t. Summed over t this is the block's
ordinary influence score. The loss term produced at position t is the prediction of token t+1, so
S[i, t] is paired with that prediction; the suppression mask penalises exactly that term
(see objective.py), and the two share one index space.

The query gradient is the gradient of sum_r w_r * L_r over the query rows, L_r the summed loss of
row r's continuation, with w_r = +1/|toxic| on toxic rows and -1/|non-toxic| on non-toxic rows
(mean toxic gradient minus mean non-toxic gradient); `toxic` uses only the toxic rows.
"""

from __future__ import annotations

import copy
import gc
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from tqdm.auto import tqdm
from transformers import set_seed

from .artifacts import Run, Stage, progress_bars_off, read_info, write_json
from .config import Config, InfluenceConfig, config_to_dict
from .errors import IfguideError
from .model import load_model
from .prepare import blocks_fingerprint
from .train import BlockDataset, block_array

ANALYSIS = "kronfluence"
FACTORS = "factors"
QUERY_KINDS = ("toxic-minus-nontoxic", "toxic", "nontoxic")
warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label of position t is token t+1; the last position has none (-100)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


class LanguageModelTask(Task):
    """Kronfluence task: summed next-token loss for training, signed weighted query loss as measurement."""

    def __init__(self, tracked_modules: list[str]):
        self.tracked_modules = tracked_modules

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits.float()
        logits = logits.view(-1, logits.size(-1))  # whole tensor, no slice: labels shift instead (no copies)
        labels = next_token_labels(batch["labels"]).view(-1)
        if sample:  # the Fisher uses labels sampled from the model
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
                labels = sampled.masked_fill(labels == -100, -100)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = next_token_labels(batch["labels"])
        per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return (per_token.sum(dim=1) * batch["weight"]).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor | None:
        return batch.get("attention_mask")


def discover_tracked_modules(model: nn.Module, override: list[str] | None = None,
                             last_layers: int | None = None) -> list[str]:
    """Every nn.Linear inside the (last `last_layers`) transformer blocks, never embeddings or LM head; or `override`.

    Tracking only the last blocks also shortens the backward pass: Kronfluence needs gradients only down to
    the lowest tracked module.
    """
    modules = dict(model.named_modules())
    if override:
        bad = [name for name in override if not isinstance(modules.get(name), nn.Linear)]
        if bad:
            raise IfguideError(f"config: influence.tracked_modules names no nn.Linear module: {', '.join(bad)}")
        return list(override)
    blocks = max((m for m in modules.values() if isinstance(m, nn.ModuleList)),
                 key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    if blocks is None:
        raise IfguideError("could not find the transformer blocks (no nn.ModuleList); set influence.tracked_modules")
    prefix = next(name for name, m in modules.items() if m is blocks) + "."
    kept = range(len(blocks))[-last_layers:] if last_layers else range(len(blocks))
    inside = {name: m for name, m in modules.items()
              if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) in kept}
    if any(type(m).__name__ == "Conv1D" for m in inside.values()):
        raise IfguideError("this model uses GPT-2 Conv1D layers, which Kronfluence does not track; "
                           "use a GPT-NeoX or Llama model (model.arch) or convert Conv1D to nn.Linear")
    tracked = [name for name, m in inside.items() if isinstance(m, nn.Linear)]
    if not tracked:
        raise IfguideError("no nn.Linear modules inside the transformer blocks; set influence.tracked_modules")
    return tracked


def query_weights(toxic: np.ndarray, kind: str) -> np.ndarray:
    """Signed per-row weights: toxic-minus-nontoxic = +1/|T| on toxic, -1/|N| on non-toxic rows."""
    toxic = np.asarray(toxic, dtype=bool)
    n_toxic, n_nontoxic = int(toxic.sum()), int((~toxic).sum())
    if kind not in QUERY_KINDS:
        raise IfguideError(f"unknown query kind '{kind}' (use one of {', '.join(QUERY_KINDS)})")
    weights = np.zeros(len(toxic), dtype=np.float32)
    if kind in ("toxic-minus-nontoxic", "toxic"):
        weights[toxic] = 1.0 / max(n_toxic, 1)
    if kind == "toxic-minus-nontoxic":
        weights[~toxic] = -1.0 / max(n_nontoxic, 1)
    if kind == "nontoxic":
        weights[~toxic] = 1.0 / max(n_nontoxic, 1)
    return weights


class QueryRows(torch.utils.data.Dataset):
    """Query rows with their signed weights (rows of weight 0 are dropped)."""

    def __init__(self, queries, kind: str):
        toxic = np.asarray(queries["toxic"], dtype=bool)
        weights = query_weights(toxic, kind)
        keep = np.flatnonzero(weights != 0)
        self.rows = [{"input_ids": torch.tensor(queries[int(i)]["input_ids"]),
                      "attention_mask": torch.tensor(queries[int(i)]["attention_mask"]),
                      "labels": torch.tensor(queries[int(i)]["labels"]),
                      "weight": torch.tensor(weights[i])} for i in keep]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _analyzer(model: nn.Module, tracked: list[str], output_dir: Path) -> Analyzer:
    task = LanguageModelTask(tracked)
    # Kronfluence wraps modules in place and caches state (e.g. einsum paths) in the wrappers, so every
    # analysis gets its own copy: the caller's model stays a plain model and no state leaks between runs.
    model = prepare_model(copy.deepcopy(model), task)
    return Analyzer(analysis_name=ANALYSIS, model=model, task=task, cpu=not torch.cuda.is_available(),
                    output_dir=str(output_dir), disable_tqdm=progress_bars_off())


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Kronfluence calls gc.collect() between phases; freezing the objects alive now spares each call a full
    scan of them (about 0.3 s per call here). Unfreezing afterwards lets any garbage among them be collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def factor_arguments(icfg: InfluenceConfig) -> FactorArguments:
    return FactorArguments(strategy=icfg.strategy, covariance_max_examples=icfg.covariance_max_examples,
                           lambda_max_examples=icfg.lambda_max_examples)


def fit_factors(model: nn.Module, blocks: np.ndarray, icfg: InfluenceConfig, out: Path, seed: int) -> dict:
    """Fit covariance, eigendecomposition and lambda factors into `out`; returns per-phase seconds."""
    tracked = discover_tracked_modules(model, icfg.tracked_modules, icfg.last_layers)
    analyzer = _analyzer(model, tracked, out)
    dataset, args = BlockDataset(blocks), factor_arguments(icfg)
    timings = {}
    set_seed(seed)
    common = dict(factors_name=FACTORS, factor_args=args, overwrite_output_dir=True)
    with frozen_heap():
        start = time.perf_counter()
        analyzer.fit_covariance_matrices(dataset=dataset, per_device_batch_size=icfg.factor_batch_size, **common)
        timings["covariance_s"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.perform_eigendecomposition(**common)
        timings["eigendecomposition_s"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.fit_lambda_matrices(dataset=dataset, per_device_batch_size=icfg.factor_batch_size, **common)
        timings["lambda_s"] = time.perf_counter() - start
    return {"tracked_modules": tracked, **timings}


def factors_dir(root: Path) -> Path:
    """Where Kronfluence keeps the factors inside a factors artifact."""
    return root / ANALYSIS / f"factors_{FACTORS}"


def score_shards(model: nn.Module, blocks: np.ndarray, queries, kind: str, icfg: InfluenceConfig,
                 factors_root: Path, work: Path, damping: float | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first block, per-token scores) shard by shard, each from one fresh Kronfluence run."""
    tracked = discover_tracked_modules(model, icfg.tracked_modules, icfg.last_layers)
    (work / ANALYSIS).mkdir(parents=True, exist_ok=True)
    link = factors_dir(work)
    if not link.exists():
        link.symlink_to(factors_dir(factors_root).resolve(), target_is_directory=True)
    analyzer = _analyzer(model, tracked, work)
    rows = QueryRows(queries, kind)
    args = ScoreArguments(compute_per_token_scores=True, aggregate_query_gradients=True,
                          damping_factor=icfg.damping if damping is None else damping)
    try:
        for start in range(0, len(blocks), icfg.shard_blocks):
            stop = min(start + icfg.shard_blocks, len(blocks))
            name = f"shard{start}"
            with frozen_heap():
                analyzer.compute_pairwise_scores(
                    scores_name=name, factors_name=FACTORS, query_dataset=rows, train_dataset=BlockDataset(blocks),
                    per_device_query_batch_size=icfg.query_batch_size,
                    per_device_train_batch_size=icfg.train_batch_size, train_indices=list(range(start, stop)),
                    score_args=args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(name)["all_modules"]
            shutil.rmtree(work / ANALYSIS / f"scores_{name}")
            yield start, scores.reshape(stop - start, blocks.shape[1]).float().numpy()
    finally:
        link.unlink(missing_ok=True)


def factors(cfg: Config, run: Run, model_name: str, force: bool = False) -> Path:
    """`ifguide factors`: EK-FAC factors of model `model_name` on the run's training blocks."""
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    icfg = cfg.influence
    recipe = {k: v for k, v in config_to_dict(icfg).items()
              if k in ("strategy", "tracked_modules", "last_layers", "covariance_max_examples",
                       "lambda_max_examples")}
    stage = Stage(run.factors(model_name), "factors", {**recipe, "seed": cfg.seed},
                  {"model": model_info["fingerprint"], "blocks": blocks_fingerprint(run.data())})
    if stage.is_done(force):
        return run.factors(model_name)
    model = load_model(run.model(model_name))
    blocks = block_array(run)
    print(f"factors: {icfg.strategy} on {len(blocks):,} blocks of model '{model_name}'")
    with stage.build() as out:
        info = fit_factors(model, blocks, icfg, out, cfg.seed)
        n_cov = min(len(blocks), icfg.covariance_max_examples or len(blocks))
        n_lam = min(len(blocks), icfg.lambda_max_examples or len(blocks))
        tokens = blocks.shape[1]
        info.update(covariance_tokens_per_s=n_cov * tokens / info["covariance_s"],
                    lambda_tokens_per_s=n_lam * tokens / info["lambda_s"],
                    covariance_examples=n_cov, lambda_examples=n_lam)
        write_json(out / "info.json", info)
    print(f"factors: covariance {info['covariance_s']:.1f}s, eigendecomposition "
          f"{info['eigendecomposition_s']:.1f}s, lambda {info['lambda_s']:.1f}s")
    return run.factors(model_name)


def scores(cfg: Config, run: Run, model_name: str, name: str | None = None, query: str | None = None,
           force: bool = False) -> Path:
    """`ifguide scores`: per-token scores of every training block, written in memory-mappable shards."""
    from datasets import load_from_disk

    icfg = cfg.influence
    query = query or icfg.query
    name = name or query
    factors_info = run.require(run.factors(model_name), f"run `ifguide factors --model {model_name}` first")
    model_info = run.require(run.model(model_name), f"run `ifguide train --name {model_name}` first")
    data_info = run.require(run.data(), "run `ifguide prepare` first")
    blocks_fp = data_info["blocks_fingerprint"]
    recipe = {"query": query, "damping": icfg.damping, "shard_blocks": icfg.shard_blocks,
              "dtype": icfg.score_dtype}
    inputs = {"model": model_info["fingerprint"], "factors": factors_info["fingerprint"], "blocks": blocks_fp,
              "queries": data_info["fingerprint"]}
    stage = Stage(run.scores(model_name, name), "scores", recipe, inputs)
    if stage.is_done(force):
        return run.scores(model_name, name)
    model = load_model(run.model(model_name))
    blocks = block_array(run)
    queries = load_from_disk(str(run.data() / "queries"))
    with stage.build() as out:
        start_time = time.perf_counter()
        shards = score_shards(model, blocks, queries, query, icfg, run.factors(model_name), out / "work")
        info = write_shards(out, shards, blocks.shape, icfg.score_dtype, desc=f"scores {name}")
        elapsed = time.perf_counter() - start_time
        shutil.rmtree(out / "work", ignore_errors=True)
        write_json(out / "info.json", {**info, "query": query, "model": model_name, "blocks_fingerprint": blocks_fp,
                                       "score_s": elapsed, "score_tokens_per_s": blocks.size / elapsed})
    print(f"scores: {blocks.shape[0]:,} x {blocks.shape[1]} per-token scores in {len(info['shards'])} shards, "
          f"{elapsed:.1f}s ({blocks.size / elapsed:,.0f} tokens/s)")
    return run.scores(model_name, name)


def write_shards(out: Path, shards: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int], dtype: str,
                 desc: str = "scores") -> dict:
    """Save (first block, scores) shards as .npy files with an info.json that ScoreReader understands."""
    entries = []
    with tqdm(total=shape[0], desc=desc, unit="block", disable=progress_bars_off()) as progress:
        for start, values in shards:
            file = f"shard_{start:09d}.npy"
            np.save(out / file, np.asarray(values, dtype=dtype))
            entries.append({"file": file, "start": start, "stop": start + len(values)})
            progress.update(len(values))
    info = {"shape": list(shape), "dtype": dtype, "shards": entries}
    write_json(out / "info.json", info)
    return info


class ScoreReader:
    """Lazy access to per-token score shards: any block range, or shard by shard, via memory maps."""

    def __init__(self, path: Path):
        info = read_info(path)
        if info is None:
            raise IfguideError(f"{path} holds no finished scores; run `ifguide scores` first")
        self.path = path
        self.info = info
        self.shape = tuple(self.info["shape"])
        self.shards = self.info["shards"]

    def shard(self, k: int) -> np.ndarray:
        return np.load(self.path / self.shards[k]["file"], mmap_mode="r")

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for k, shard in enumerate(self.shards):
            yield shard["start"], self.shard(k)

    def blocks(self, start: int, stop: int) -> np.ndarray:
        """Scores of blocks [start, stop) as one array, reading only the shards that overlap."""
        parts = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
            if lo < hi:
                parts.append(np.asarray(self.shard(k)[lo - shard["start"]: hi - shard["start"]]))
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), dtype=self.info["dtype"])
