"""Package faces: a package's public names, each imported from its module on first use, so importing a package
costs nothing until a name is used (the CLI checks its arguments before torch or transformers load)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def face(package: str, exports: dict[str, list[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """(__all__, __getattr__) for `package`, given {module: [public names]}; a module may export itself by
    name."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{home[name]}")
        return module if name == home[name] else getattr(module, name)

    return sorted(home), __getattr__
