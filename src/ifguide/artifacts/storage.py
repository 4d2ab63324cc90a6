"""Safe artifact I/O: stable hashes, atomic writes, and loads that never unpickle and name what is damaged."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

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


def damaged(path: Path, what: str) -> ArtifactError:
    """The one-line error for an artifact that cannot be read as built."""
    return ArtifactError(path, f"{path} is damaged ({what})")


def read_info(path: Path, fingerprinted: bool = True) -> dict | None:
    """The info.json of an artifact directory, or None when it is absent (not built, or unfinished); one that
    is not a JSON object, or (`fingerprinted`: a finished stage's) has no fingerprint, is damaged."""
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
    """`path / name` for a file name read from an artifact's info.json, refused unless it stays inside
    `path`."""
    if not isinstance(name, str) or not name:
        raise damaged(path, f"file name {name!r} in info.json")
    file = path / name
    if not file.resolve().is_relative_to(path.resolve()):
        raise damaged(path, f"info.json names {name!r}, outside the artifact")
    return file


def load_array(path: Path, name: str, dtype: str | None = None, mmap: bool = False) -> Any:
    """A .npy or .npz file of an artifact, never unpickled (object arrays are refused); a missing, truncated
    or wrongly typed file is damaged."""
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


@functools.cache
def checkpoint_fingerprint(path: Path) -> str:
    """A hash of a checkpoint's config and weight files: a model trained from it is rebuilt when it
    changes."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in (".safetensors", ".bin"):
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
