"""The run-directory layout, atomic artifact writes, and stage skip/redo decisions."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import Config, config_from_dict, config_to_dict, parse_yaml
from .errors import IfguideError

INFO = "info.json"


def fingerprint(payload: Any) -> str:
    """A short, stable hash of any JSON-serialisable payload."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename it into place."""
    write_text(path, json.dumps(payload, indent=1, sort_keys=True, default=str))


def write_text(path: Path, text: str) -> None:
    """Write text atomically: temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # nothing half-written is left beside the target
        raise


@functools.cache
def code_fingerprint() -> str:
    """The package version plus a hash of its source, presets and registry: artifacts of other code are not reused."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for file in sorted(package.rglob("*")):
        if file.suffix in (".py", ".yaml", ".json") and "__pycache__" not in file.parts:
            digest.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def progress_bars_off() -> bool:
    """Progress bars are off under CI (CI=true), on otherwise."""
    return os.environ.get("CI") == "true"


def rebuild_command(path: Path) -> str:
    """The command that rebuilds the artifact at `path`, read off the run layout (see DESIGN.md)."""
    parts = path.parts
    for pattern, command in _REBUILD:
        n = len(pattern)
        for i in range(len(parts) - n, -1, -1):
            window = parts[i:i + n]
            if all(p == "*" or p == w for p, w in zip(pattern, window)) and not window[-1].startswith("."):
                names = [w for p, w in zip(pattern, window) if p == "*"]
                if "parts" in pattern:  # SCORES/parts/I-of-N is `--shard I/N`
                    names[-1] = names[-1].replace("-of-", "/")
                root = Path(*parts[:i]) if i else Path(".")
                spans = _spans_file(Path(*parts[:i + n])) if pattern == ("masks", "*") else None
                if spans is not None:  # an imported mask is rebuilt from its span file, not selected
                    return f"ifguide import-mask --run {root} --spans {shlex.quote(spans)} --name {names[0]} --force"
                return f"ifguide {command.format(*names, run=root)} --force"
    return "the stage that wrote it, with --force"


def _spans_file(mask: Path) -> str | None:
    """The span file an imported mask was built from; read without checks, since its info.json may be the damage."""
    try:
        info = json.loads((mask / INFO).read_text())
        return str(info["spans"]) if info.get("method") == "import" else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


_REBUILD = [  # (layout pattern, command) from the most specific to the least
    (("influence", "*", "scores", "*", "parts", "*"), "scores --run {run} --model {0} --name {1} --shard {2}"),
    (("influence", "*", "scores", "*"), "scores --run {run} --model {0} --name {1}"),
    (("influence", "*", "directions", "*"), "scores --run {run} --model {0}"),
    (("influence", "*", "factors"), "factors --run {run} --model {0}"),
    (("models", "*"), "train --run {run} --name {0}"),
    (("masks", "*"), "select --run {run} --name {0}"),
    (("queries", "*"), "queries --run {run} --name {0}"),
    (("eval", "*", "*"), "eval --run {run} --model {0} --prompts {1}"),
    (("preferences", "*"), "dpo --run {run}"),
    (("reward",), "reward --run {run}"),
    (("data",), "prepare --run {run}"),
]


def damaged(path: Path, what: str) -> IfguideError:
    """The one-line error for an artifact that cannot be read as built."""
    return IfguideError(f"{path} is damaged ({what}); rebuild it with `{rebuild_command(path)}`")


def read_info(path: Path, fingerprinted: bool = True) -> dict | None:
    """The info.json of an artifact directory, or None when it is absent (not built, or unfinished); one that is not a
    JSON object, or (`fingerprinted`: a finished stage's) has no fingerprint, is damaged."""
    file = path / INFO
    if not file.is_file():
        return None
    try:
        info = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise damaged(path, "info.json is not JSON") from None
    if not isinstance(info, dict):
        raise damaged(path, f"info.json holds a {type(info).__name__}, not an object")
    if fingerprinted and not isinstance(info.get("fingerprint"), str):
        raise damaged(path, "info.json has no fingerprint")
    return info


def artifact_file(path: Path, name: str) -> Path:
    """`path / name` for a file name read from an artifact's info.json, refused unless it stays inside `path`."""
    if not isinstance(name, str) or not name:
        raise damaged(path, f"file name {name!r} in info.json")
    file = path / name
    if not file.resolve().is_relative_to(path.resolve()):
        raise damaged(path, f"info.json names {name!r}, outside the artifact")
    return file


def load_array(path: Path, name: str, dtype: str | None = None, mmap: bool = False) -> Any:
    """A .npy or .npz file of an artifact, never unpickled (object arrays are refused); a missing, truncated or
    wrongly typed file is damaged."""
    import numpy as np

    file = artifact_file(path, name)
    try:
        loaded = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        arrays = dict(loaded.items()) if isinstance(loaded, np.lib.npyio.NpzFile) else {name: loaded}
    except FileNotFoundError:
        raise damaged(path, f"{name} is missing") from None
    except ValueError as exc:
        pickled = "allow_pickle" in str(exc) or "Python objects" in str(exc)
        what = "holds Python objects" if pickled else "is truncated or not an array"
        raise damaged(path, f"{name} {what}") from None
    except (OSError, EOFError, zipfile.BadZipFile):
        raise damaged(path, f"{name} is truncated or not an array") from None
    for key, array in arrays.items():
        if dtype is not None and array.dtype != np.dtype(dtype):
            raise damaged(path, f"{key} holds {array.dtype}, not {dtype}")
    return arrays if isinstance(loaded, np.lib.npyio.NpzFile) else loaded


def load_tensors(path: Path, name: str) -> dict:
    """A safetensors file of an artifact; a missing or truncated one is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(artifact_file(path, name)))
    except (OSError, SafetensorError) as exc:
        raise damaged(path, f"{name}: {str(exc).splitlines()[0][:80]}") from None


@dataclass
class Stage:
    """One artifact directory: its recipe (stage, config section, input fingerprints) decides skip or redo."""

    path: Path
    stage: str
    config: dict
    inputs: dict[str, str]
    built_from: tuple[Path, ...] = ()  # the artifacts read; their fingerprints are checked again at every use

    @property
    def recipe(self) -> dict:
        return {"stage": self.stage, "config": self.config, "inputs": self.inputs, "code": code_fingerprint()}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.recipe)

    def is_done(self, force: bool = False) -> bool:
        """True (and says so) when the artifact exists with the same recipe; refuse a changed one unless `force`,
        which always rebuilds."""
        info = read_info(self.path)
        if info is None or force:
            return False
        if info.get("fingerprint") == self.fingerprint:
            print(f"{self.stage}: {self.path} is up to date")
            return True
        changed = _changed_keys(info.get("recipe", {}), self.recipe)
        raise IfguideError(
            f"{self.path} was built from other inputs ({', '.join(changed) or 'recipe'} changed); "
            "rerun with --force to replace it"
        )

    @contextlib.contextmanager
    def build(self) -> Iterator[Path]:
        """Yield a temporary directory; on success write info.json and swap it into place atomically."""
        created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _remove_if_left_empty(created), stage_lock(self.path):
            remove_stale_temporaries(self.path)
            tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.building-{os.getpid()}-"))
            os.chmod(tmp, 0o777 & ~current_umask())
            try:
                with _disk_full_is_one_line(self.path):
                    yield tmp
                    extra = read_info(tmp, fingerprinted=False) or {}
                    built_from = {os.path.relpath(p, self.path): read_info(p)["fingerprint"] for p in self.built_from}
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
                if tmp.exists():
                    shutil.rmtree(tmp)


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
            raise IfguideError(f"disk full at {path.parent} while writing {path.name}; nothing was kept, free some "
                               "space and rerun") from None
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
    """The one-line error of a second builder, given before any set-up: the CLI checks it before heavy imports."""
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


def follow_umask(root: Path) -> None:
    """Give every file and folder under `root` the umask's modes (libraries write some files 0600)."""
    umask = current_umask()
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def artifact_name(name: str, what: str = "name") -> str:
    """A name that can only ever be a proper child folder: non-empty, no path separator, not '.' or '..'."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name \
            or name.startswith("."):
        raise IfguideError(f"{what} {name!r} is not a valid artifact name: use letters, digits, '-', '_' "
                           "(not empty, no '/', not starting with '.')")
    return name


class Run:
    """The layout of one run directory; every stage asks it where to read and write."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise IfguideError(f"--run {self.root} is a file, not a run directory")

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def data(self) -> Path:
        return self.root / "data"

    def model(self, name: str) -> Path:
        return self.root / "models" / artifact_name(name, "model name")

    def factors(self, model: str) -> Path:
        return self.root / "influence" / artifact_name(model, "model name") / "factors"

    def direction(self, model: str, query: str) -> Path:
        return self.root / "influence" / artifact_name(model, "model name") / "directions" / artifact_name(query)

    def scores(self, model: str, name: str) -> Path:
        return self.root / "influence" / artifact_name(model, "model name") / "scores" / artifact_name(name)

    def queries(self, name: str) -> Path:
        if name == "rtp":
            raise IfguideError("queries name 'rtp' is the built-in RTP query set; give the new set another name")
        return self.root / "queries" / artifact_name(name, "queries name")

    def mask(self, name: str) -> Path:
        return self.root / "masks" / artifact_name(name, "mask name")

    def eval(self, model: str, prompts: str) -> Path:
        return self.root / "eval" / artifact_name(model, "model name") / artifact_name(prompts, "prompt set")

    def report(self) -> Path:
        return self.root / "report"

    def reward(self) -> Path:
        return self.root / "reward"

    def preferences(self, model: str) -> Path:
        return self.root / "preferences" / artifact_name(model, "model name")

    def check_config(self, cfg: Config, force: bool = False) -> None:
        """Refuse a config other than the one this run recorded, unless `force`."""
        payload = config_to_dict(cfg)
        if self.config_path.is_file() and not force:
            existing = parse_yaml(self.config_path.read_text(), str(self.config_path))
            if existing != payload:
                changed = _changed_keys(existing if isinstance(existing, dict) else {}, payload)
                raise IfguideError(
                    f"{self.config_path} holds another config ({', '.join(changed[:5])} differ); "
                    "use a new --run directory or pass --force"
                )

    def save_config(self, cfg: Config) -> None:
        """Record the run's config (after `prepare` built the data it describes)."""
        write_text(self.config_path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def load_config(self) -> Config:
        """The config that `prepare` recorded in this run; one whose data section no longer matches the prepared
        data (a hand edit) is refused."""
        if not self.config_path.is_file():
            raise IfguideError(f"{self.root} is not a prepared run (no config.yaml); run `ifguide prepare` first")
        values = parse_yaml(self.config_path.read_text(), str(self.config_path))
        if not isinstance(values, dict):
            raise IfguideError(f"{self.config_path} is empty or not a mapping; rerun `ifguide prepare --force`")
        cfg = config_from_dict(values)
        built = (read_info(self.data()) or {}).get("recipe", {}).get("config")
        current = {"seed": cfg.seed, "data": config_to_dict(cfg.data)}
        if built is not None and built != current:
            changed = _changed_keys(built, current)
            raise IfguideError(f"{self.config_path} was edited: {', '.join(changed[:5])} no longer match the prepared "
                               f"data; rerun `ifguide prepare --config {self.config_path} --run {self.root} --force`")
        return cfg

    def check_output(self, path: Path, flag: str) -> None:
        """A file a command writes outside its artifacts: neither a folder nor anywhere inside this run."""
        if path.is_dir():
            raise IfguideError(f"{flag} {path} is a folder; name a file in it")
        if path.resolve().is_relative_to(self.root.resolve()):
            raise IfguideError(f"{flag} {path} lies inside the run {self.root}; write it outside the run, whose "
                               "artifacts only their stages write")

    def require(self, path: Path, hint: str) -> dict:
        """The info.json of a finished artifact whose inputs, and theirs in turn, are still the ones it was built
        from; else a one-line error saying which command builds or rebuilds it."""
        info = read_info(path)
        if info is None:
            raise IfguideError(f"{path} is missing; {hint}")
        self.check_current(path, info)
        return info

    def checkpoint(self, init: str, what: str = "--init") -> Path:
        """A trained model of this run (checked current) or a save_pretrained checkpoint directory; `what` names the
        setting in the error (--init, model.init_from)."""
        if "/" not in init and not init.startswith(".") and read_info(self.model(init)) is not None:
            self.require(self.model(init), "")
            return self.model(init)
        if (Path(init) / "config.json").is_file():
            return Path(init)
        raise IfguideError(f"{what} {init} is neither a trained model of this run nor a checkpoint directory "
                           "(with config.json)")

    def own(self, *paths: Path | None) -> tuple[Path, ...]:
        """The given paths that are artifacts of this run (a Stage's `built_from`), leaving out outside checkpoints."""
        root = self.root.resolve()
        return tuple(p for p in paths if p is not None and p.resolve().is_relative_to(root))

    def check_current(self, path: Path, info: dict, _seen: set[Path] | None = None) -> None:
        """Refuse an artifact one of whose inputs, however far back, was rebuilt or removed since it was built."""
        seen = set() if _seen is None else _seen
        built_from = info.get("built_from", {})
        if not isinstance(built_from, dict):
            raise damaged(path, "built_from is not an object")
        for rel, expected in built_from.items():
            source = path / rel
            if not source.resolve().is_relative_to(self.root.resolve()):
                raise damaged(path, f"built_from names {rel!r}, outside the run")
            source = Path(os.path.normpath(source))
            current = read_info(source)
            if current is None or current["fingerprint"] != expected:
                what = "was removed" if current is None else "was rebuilt"
                raise IfguideError(f"{path} is stale: its input {source} {what} since; rebuild it with "
                                   f"`{rebuild_command(path)}`")
            if source not in seen:
                seen.add(source)
                self.check_current(source, current, seen)
