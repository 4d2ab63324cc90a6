"""The run-directory layout, atomic artifact writes, and stage skip/redo decisions."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import Config, config_from_dict, config_to_dict
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
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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


def read_info(path: Path) -> dict | None:
    """The info.json of an artifact directory, or None when it is absent (not built, or unfinished)."""
    info = path / INFO
    return json.loads(info.read_text()) if info.is_file() else None


@dataclass
class Stage:
    """One artifact directory: its recipe (stage, config section, input fingerprints) decides skip or redo."""

    path: Path
    stage: str
    config: dict
    inputs: dict[str, str]

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.building-"))
        try:
            yield tmp
            extra = read_info(tmp) or {}
            write_json(tmp / INFO, {**extra, "recipe": self.recipe, "fingerprint": self.fingerprint})
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


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


class Run:
    """The layout of one run directory; every stage asks it where to read and write."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def data(self) -> Path:
        return self.root / "data"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def factors(self, model: str) -> Path:
        return self.root / "influence" / model / "factors"

    def direction(self, model: str, query: str) -> Path:
        return self.root / "influence" / model / "directions" / query

    def scores(self, model: str, name: str) -> Path:
        return self.root / "influence" / model / "scores" / name

    def mask(self, name: str) -> Path:
        return self.root / "masks" / name

    def eval(self, model: str, prompts: str) -> Path:
        return self.root / "eval" / model / prompts

    def report(self) -> Path:
        return self.root / "report"

    def scorer(self, name: str) -> Path:
        return self.root / "scorers" / name

    def save_config(self, cfg: Config, force: bool = False) -> None:
        """Record the run's config; a different one is refused unless `force`."""
        payload = config_to_dict(cfg)
        if self.config_path.is_file() and not force:
            existing = yaml.safe_load(self.config_path.read_text())
            if existing != payload:
                changed = _changed_keys(existing, payload)
                raise IfguideError(
                    f"{self.config_path} holds another config ({', '.join(changed[:5])} differ); "
                    "use a new --run directory or pass --force"
                )
        write_text(self.config_path, yaml.safe_dump(payload, sort_keys=False))

    def load_config(self) -> Config:
        """The config that `prepare` recorded in this run."""
        if not self.config_path.is_file():
            raise IfguideError(f"{self.root} is not a prepared run (no config.yaml); run `ifguide prepare` first")
        return config_from_dict(yaml.safe_load(self.config_path.read_text()))

    def require(self, path: Path, hint: str) -> dict:
        """The info.json of a finished artifact, or a one-line error saying which command builds it."""
        info = read_info(path)
        if info is None:
            raise IfguideError(f"{path} is missing; {hint}")
        return info
