"""Registry of the public source files: origin, sha256, reading from a mirror, fetching from origin."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import IfguideError

RAW_GITHUB = "https://raw.githubusercontent.com"


@cache
def registry() -> dict[str, dict]:
    """Every known file: mirror-relative name -> {repo, commit, path, sha256, bytes, license}."""
    return json.loads(resources.files("ifguide").joinpath("sources.json").read_text())


def mirror_dir() -> Path:
    """The local mirror named by IFGUIDE_DATA (default: ../shared/data when it exists)."""
    env = os.environ.get("IFGUIDE_DATA")
    if env:
        return Path(env)
    return Path("../shared/data")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def origin_url(name: str, base_url: str = RAW_GITHUB) -> str:
    """The pinned-commit URL of a registry file."""
    entry = _entry(name)
    if "(packed)" in entry["path"]:
        raise IfguideError(f"{name} is packed from several origin files and cannot be fetched; use a mirror")
    return f"{base_url}/{entry['repo']}/{entry['commit']}/{entry['path']}"


def _entry(name: str) -> dict:
    try:
        return registry()[name]
    except KeyError:
        raise IfguideError(f"'{name}' is not a known source file") from None


def fetch(name: str, mirror: Path, base_url: str = RAW_GITHUB) -> Path:
    """Download a registry file from its origin at the pinned commit into `mirror`, checking its sha256."""
    target = mirror / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download")
    try:
        with urllib.request.urlopen(origin_url(name, base_url), timeout=60) as response, \
                open(tmp, "wb") as out:
            out.write(response.read())
    except OSError as exc:
        raise IfguideError(f"could not fetch {name} from {origin_url(name, base_url)}: {exc}") from None
    if sha256_of(tmp) != _entry(name)["sha256"]:
        tmp.unlink()
        raise IfguideError(f"{name} fetched from origin has the wrong sha256; the origin changed")
    os.replace(tmp, target)
    return target


def mirror_name(path: Path) -> str | None:
    """The registry name of `path` when it lies in the mirror and is a known file, else None."""
    try:
        name = path.resolve().relative_to(mirror_dir().resolve()).as_posix()
    except ValueError:
        return None
    return name if name in registry() else None


def source_path(name: str, mirror: Path | None = None, fetch_missing: bool = False) -> Path:
    """The verified local path of a registry file; a missing or corrupted file is a clear error."""
    mirror = mirror or mirror_dir()
    entry = _entry(name)
    path = mirror / name
    if not path.is_file():
        if fetch_missing:
            return fetch(name, mirror)
        raise IfguideError(
            f"data file {path} is missing; set IFGUIDE_DATA to the data mirror "
            "(or pass --fetch to download it from its origin)"
        )
    if sha256_of(path) != entry["sha256"]:
        raise IfguideError(
            f"data file {path} is corrupted (sha256 mismatch with {entry['repo']}@{entry['commit'][:8]}:"
            f"{entry['path']}); restore it from the mirror or its origin"
        )
    return path
