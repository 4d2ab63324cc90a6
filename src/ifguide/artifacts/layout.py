"""The layout of a run directory: where every stage reads and writes, and whether what it reads is current."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..config import Config, config_from_dict, config_to_dict, parse_yaml
from ..errors import ArtifactError, IfguideError
from .build import changed_keys
from .storage import checkpoint_fingerprint, damaged, read_info, write_text


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

    def influence(self, model: str) -> Path:
        """RUN/influence/MODEL: the factors, query directions and score sets of one scoring model."""
        return self.root / "influence" / artifact_name(model, "model name")

    def factors(self, model: str) -> Path:
        return self.influence(model) / "factors"

    def direction(self, model: str, query: str) -> Path:
        return self.influence(model) / "directions" / artifact_name(query)

    def scores(self, model: str, name: str) -> Path:
        return self.influence(model) / "scores" / artifact_name(name)

    def queries(self, name: str) -> Path:
        if name == "rtp":
            raise IfguideError("queries name 'rtp' is the built-in RTP query set; give the new "
                               "set another name")
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
        """Refuse a config other than the one this run recorded, unless `force`. A setting added since the
        run was recorded counts at its default (which keeps the old behaviour)."""
        if not self.config_path.is_file() or force:
            return
        existing = parse_yaml(self.config_path.read_text(), str(self.config_path))
        existing = existing if isinstance(existing, dict) else {}
        try:
            recorded = config_to_dict(config_from_dict(existing))
        except IfguideError:  # a setting since removed or renamed: compare the file as written
            recorded = existing
        payload = config_to_dict(cfg)
        if recorded != payload:
            raise IfguideError(
                f"{self.config_path} holds another config ({', '.join(changed_keys(recorded, payload)[:5])} "
                "differ); use a new --run directory or pass --force")

    def save_config(self, cfg: Config) -> None:
        """Record the run's config (after `prepare` built the data it describes)."""
        write_text(self.config_path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def load_config(self) -> Config:
        """The config that `prepare` recorded in this run; one whose data section no longer matches the
        prepared data (a hand edit) is refused."""
        if not self.config_path.is_file():
            raise IfguideError(f"{self.root} is not a prepared run (no config.yaml); run "
                               "`ifguide prepare` first")
        values = parse_yaml(self.config_path.read_text(), str(self.config_path))
        if not isinstance(values, dict):
            raise IfguideError(f"{self.config_path} is empty or not a mapping; rerun `ifguide "
                               "prepare --force`")
        cfg = config_from_dict(values)
        built = (read_info(self.data()) or {}).get("recipe", {}).get("config")
        current = {"seed": cfg.seed, "data": config_to_dict(cfg.data)}
        if built is not None and built != current:
            changed = changed_keys(built, current)
            raise IfguideError(f"{self.config_path} was edited: {', '.join(changed[:5])} no longer match the "
                               f"prepared data; rerun `ifguide prepare --config {self.config_path} --run "
                               f"{self.root} --force`")
        return cfg

    def check_output(self, path: Path, flag: str) -> None:
        """A file a command writes outside its artifacts: neither a folder nor anywhere inside this run."""
        if path.is_dir():
            raise IfguideError(f"{flag} {path} is a folder; name a file in it")
        if path.resolve().is_relative_to(self.root.resolve()):
            raise IfguideError(f"{flag} {path} lies inside the run {self.root}; write it outside the run, "
                               "whose artifacts only their stages write")

    def require(self, path: Path, hint: str) -> dict:
        """The info.json of a finished artifact whose inputs, and theirs in turn, are still the ones it was
        built from; else a one-line error saying which command builds or rebuilds it."""
        info = read_info(path)
        if info is None:
            raise IfguideError(f"{path} is missing; {hint}")
        self.check_current(path, info)
        return info

    def checkpoint(self, init: str, what: str = "--init") -> Path:
        """A trained model of this run (checked current) or a save_pretrained checkpoint directory; `what`
        names the setting in the error (--init, model.init_from)."""
        if "/" not in init and not init.startswith(".") and read_info(self.model(init)) is not None:
            self.require(self.model(init), "")
            return self.model(init)
        if (Path(init) / "config.json").is_file():
            return Path(init)
        raise IfguideError(f"{what} {init} is neither a trained model of this run nor a checkpoint directory "
                           "(with config.json)")

    def checkpoint_identity(self, path: Path) -> str:
        """A checkpoint's fingerprint: the recorded one for a model of this run, else a hash of its files."""
        return read_info(path)["fingerprint"] if self.own(path) else checkpoint_fingerprint(path.resolve())

    def own(self, *paths: Path | None) -> tuple[Path, ...]:
        """The given paths that are artifacts of this run (a Stage's `built_from`), leaving out outside
        checkpoints."""
        root = self.root.resolve()
        return tuple(p for p in paths if p is not None and p.resolve().is_relative_to(root))

    def check_current(self, path: Path, info: dict, _seen: set[Path] | None = None) -> None:
        """Refuse an artifact one of whose inputs, however far back, was rebuilt or removed since it was
        built."""
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
                raise ArtifactError(path, f"{path} is stale: its input {source} {what} since")
            if source not in seen:
                seen.add(source)
                self.check_current(source, current, seen)
