"""The stage build protocol: a recipe decides skip or redo, a lock admits one builder, a finished artifact is
swapped into place whole, and an interrupted resumable build keeps its work for the rerun."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import IfguideError
from .storage import INFO, current_umask, fingerprint, follow_umask, read_info, write_json

log = logging.getLogger(__name__)

# What each stage computes from the same config and inputs. Bump a stage's number whenever its arithmetic
# changes (not for docs, messages or refactors): artifacts of the old number are then refused.
# tests/artifacts/test_stage_digests.py keeps a digest of every stage's output per number, so an output that
# changes under an unchanged number fails CI.
COMPUTATION_VERSIONS = {
    "prepare": 1,  # data/: sources, documents, tokenizer, blocks, prompt sets, query rows
    "reward": 1,  # toxicity/reward.py
    "queries": 2,  # queries/, model.generate (2: our own sampler)
    "factors": 1,  # influence/: EK-FAC factors
    "direction": 1,  # influence/: the preconditioned query gradient P
    "scores": 1,  # influence/: per-token scores
    "select": 1,  # selection/: Algorithm 1, blocklist-tokens, sentence labels, import-mask
    "train": 2,  # training/, model.py (2: exact unlikelihood; lam 0 masks)
    "dpo": 2,  # baselines/dpo.py's DPO fine-tuning, in fp32 (2: pairs tokenized as generation saw them)
    "preferences": 2,  # baselines/dpo.py's preference pairs (2: our own sampler)
    "eval": 2,  # evaluation/, toxicity/scorers.py, model.generate, baselines/rad.py (2: our own sampler)
}
# the folder of a resumable build's work in progress (checkpoints, journals); never published
RESUME = "resume"


@dataclass
class Stage:
    """One artifact directory: its recipe (stage, computation version, config section, input fingerprints)
    decides skip or redo."""

    path: Path
    stage: str
    config: dict
    inputs: dict[str, str]
    built_from: tuple[Path, ...] = ()  # the artifacts read; their fingerprints are checked again at every use

    @property
    def recipe(self) -> dict:
        return {"stage": self.stage, "version": COMPUTATION_VERSIONS[self.stage], "config": self.config,
                "inputs": self.inputs}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.recipe)

    @property
    def partial(self) -> Path:
        """Where a resumable build works: `.NAME.partial` beside the artifact, kept when the build is
        interrupted."""
        return self.path.with_name(f".{self.path.name}.partial")

    def is_done(self, force: bool = False) -> bool:
        """True (and says so) when the artifact exists with the same recipe; refuse a changed one unless
        `force`, which always rebuilds."""
        info = read_info(self.path)
        if info is None or force:
            return False
        if info.get("fingerprint") == self.fingerprint:
            log.info(f"{self.stage}: {self.path} is up to date")
            return True
        changed = changed_keys(info.get("recipe", {}), self.recipe)
        raise IfguideError(
            f"{self.path} was built from other inputs ({', '.join(changed) or 'recipe'} changed); "
            "rerun with --force to replace it"
        )

    @contextlib.contextmanager
    def build(self, resumable: bool = False, force: bool = False) -> Iterator[Path]:
        """Yield a temporary directory; on success write info.json and swap it into place atomically.

        `resumable`: the directory is `partial`, whose RESUME folder (checkpoints, journals) survives an
        interrupted build of the same recipe for the rerun to continue from; `force` or another recipe starts
        it afresh."""
        created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _remove_if_left_empty(created), stage_lock(self.path):
            remove_stale_temporaries(self.path)
            tmp = self._resume_folder(force) if resumable else Path(
                tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.building-{os.getpid()}-"))
            os.chmod(tmp, 0o777 & ~current_umask())
            try:
                with _disk_full_is_one_line(self.path):
                    yield tmp
                    shutil.rmtree(tmp / RESUME, ignore_errors=True)
                    extra = read_info(tmp, fingerprinted=False) or {}
                    built_from = {os.path.relpath(p, self.path): read_info(p)["fingerprint"]
                                  for p in self.built_from}
                    write_json(tmp / INFO, {**extra, "recipe": self.recipe, "fingerprint": self.fingerprint,
                                            **({"built_from": built_from} if built_from else {})})
                follow_umask(tmp)
                old = None
                if self.path.exists():
                    old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                    os.replace(self.path, old)
                os.replace(tmp, self.path)
                if old is not None:
                    shutil.rmtree(old)
            finally:
                if tmp.exists() and not (resumable and _holds_work(tmp / RESUME)):
                    shutil.rmtree(tmp)  # a build that failed before any work leaves no trace

    def _resume_folder(self, force: bool) -> Path:
        """`partial`, emptied unless it holds work of this very recipe; its RESUME/recipe.txt says whose
        work."""
        recipe = self.partial / RESUME / "recipe.txt"
        if self.partial.exists() and (force or not recipe.is_file()
                                      or recipe.read_text() != self.fingerprint):
            shutil.rmtree(self.partial)
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(self.fingerprint)
        return self.partial


def _holds_work(resume: Path) -> bool:
    """Whether an interrupted build's RESUME folder holds anything besides the recipe it belongs to."""
    return resume.is_dir() and any(entry.name != "recipe.txt" for entry in resume.iterdir())


@contextlib.contextmanager
def _remove_if_left_empty(folders: list[Path]) -> Iterator[None]:
    """On failure, remove the (new) parent folders a build created, so that a failed stage leaves no trace."""
    try:
        yield
    except BaseException:
        for folder in folders:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # OSError, or a library's own error (safetensors) carrying ENOSPC
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            raise IfguideError(f"disk full at {path.parent} while writing {path.name}; nothing was kept, "
                               "free some space and rerun") from None
        raise


def finished(paths: Iterable[Path]) -> list[Path]:
    """The paths that lie in no hidden (temporary) folder, sorted."""
    return sorted(p for p in paths if not any(part.startswith(".") for part in p.parts[-3:-1]))


def _already_building(path: Path, handle) -> IfguideError:
    handle.seek(0)
    owner = handle.read().strip() or "?"
    handle.close()
    return IfguideError(f"{path} is already being built (pid {owner}); wait for it or stop that process")


def refuse_if_building(path: Path) -> None:
    """The one-line error of a second builder, given before any set-up: the CLI checks it before heavy
    imports."""
    import fcntl

    try:
        handle = open(path.with_name(f".{path.name}.lock"))
    except FileNotFoundError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _already_building(path, handle) from None
    handle.close()


@contextlib.contextmanager
def stage_lock(path: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside an artifact while it is built; a second builder gets a one-line error."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _already_building(path, handle) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()
        lock.unlink(missing_ok=True)


def wait_for_builder(path: Path) -> None:
    """Block while another process holds the build lock of `path` (see stage_lock)."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock)
    except FileNotFoundError:
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.NAME.building-PID-*` / `.NAME.old-PID` folders beside `path` left by processes that died."""
    for tmp in path.parent.glob(f".{path.name}.*"):
        parts = tmp.name[len(path.name) + 2:].split("-")
        if tmp.is_dir() and parts[0] in ("building", "old") and len(parts) > 1 and parts[1].isdigit() \
                and not _alive(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)


_ABSENT = object()  # a key one side of changed_keys lacks


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, a key present on one side only included."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:  # _ABSENT equals nothing else
            keys.append(prefix + key)
    return keys


class Journal:
    """The finished units of a resumable build (batches of prompts, score shards), one JSON line each,
    appended as each finishes; a line a kill cut short is dropped, and its unit is done again."""

    def __init__(self, path: Path):
        self.path, self.done = path, {}
        data = path.read_bytes() if path.is_file() else b""
        whole = 0
        for line in data.split(b"\n")[:-1]:
            try:
                key, value = json.loads(line)
            except ValueError:
                break
            self.done[key], whole = value, whole + len(line) + 1
        if whole < len(data):
            with path.open("r+b") as handle:
                handle.truncate(whole)

    def record(self, key: str, value) -> None:
        """Mark unit `key` finished with its result `value` (JSON)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps([key, value]) + "\n")
        self.done[key] = value
