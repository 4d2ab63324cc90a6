"""The package's shape: imports run one way through the layers, with no cycle, and cross packages only through
faces.

Every import in src/ifguide counts, at module level or inside a function. A name imported from a package face
(`from ..data import load_tokenizer`) is an edge to the module that defines it, read off the face's table.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ifguide"
# Lowest first: a unit may import only from units at or before its own place.
LAYERS = ("_face", "errors", "names", "console", "config", "artifacts", "data", "model", "toxicity",
          "queries", "influence", "selection", "training", "baselines", "evaluation", "pipeline", "cli")
ROOT_CONSTANTS = {"__version__"}  # defined in ifguide/__init__.py before anything is imported


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def face_table(init: Path) -> dict[str, str]:
    """name -> defining module, from a package __init__'s face(__name__, {module: [names]}) call."""
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "face":
            exports = ast.literal_eval(node.args[1])
            package = module_name(init)
            return {name: f"{package}.{module}" for module, names in exports.items() for name in names}
    return {}


def import_edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported module, name or '', line) for every ifguide import inside src/ifguide."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    faces = {module_name(p): face_table(p) for p in PACKAGE.rglob("__init__.py")}
    edges = []
    for importer, path in modules.items():
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join(base + (node.module.split(".") if node.module else []))
                elif node.module and node.module.split(".")[0] == "ifguide":
                    target = node.module
                else:
                    continue
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:  # `from . import corpora`: the submodule itself
                        edges.append((importer, f"{target}.{alias.name}", "", node.lineno))
                    else:
                        defined_in = faces.get(target, {}).get(alias.name, target)
                        edges.append((importer, defined_in, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                edges += [(importer, a.name, "", node.lineno) for a in node.names
                          if a.name.startswith("ifguide")]
    return edges


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ifguide"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_on_hand_built_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"y"}, "y": set(), "p": {"q"}, "q": {"p"}}) == ["p", "q", "p"]


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for importer, target, name, _ in import_edges():
        if target != importer and not (target == "ifguide" and name in ROOT_CONSTANTS):
            graph.setdefault(importer, set()).add(target)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_run_down_the_layers():
    upward = [f"{importer}:{line} imports {target} ({unit(target)} sits above {unit(importer)})"
              for importer, target, name, line in import_edges()
              if unit(importer) != "ifguide" and not (target == "ifguide" and name in ROOT_CONSTANTS)
              and LAYERS.index(unit(target)) > LAYERS.index(unit(importer))]
    assert not upward, "\n".join(upward)
    assert {unit(module_name(p)) for p in PACKAGE.rglob("*.py")} - {"ifguide", "presets"} == set(LAYERS)


def test_other_packages_are_reached_only_through_their_face():
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")} - {"ifguide", "ifguide.presets"}
    behind = []
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                parts = importer.split(".")
                base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + node.module.split("."))
                home = next((p for p in packages if target.startswith(p + ".")), None)
                # the root face names modules
                if home and not importer.startswith(home) and importer != "ifguide":
                    behind.append(f"{importer}:{node.lineno} imports {target}; use `from {home} import ...`")
    assert not behind, "\n".join(behind)


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: module_name(p))
def test_faces_name_what_their_modules_define(init):
    table = face_table(init)
    package = module_name(init)
    submodules = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir()
                                                               if p.is_dir()}
    for name, home in table.items():
        defined = importlib.import_module(home)
        assert name == home.rsplit(".", 1)[1] or hasattr(defined,
                                                         name), f"{package}: {home} defines no {name}"
        # a face name equal to a submodule's name would be shadowed by that module once it is imported
        assert name not in submodules or home == f"{package}.{name}", f"{package}.{name} is also a module"
        assert getattr(importlib.import_module(package), name) is (
            defined if home == f"{package}.{name}" else getattr(defined, name))
    if package != "ifguide.presets":
        assert importlib.import_module(package).__doc__.strip(), f"{package} has no docstring"


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: module_name(p))
def test_type_checkers_see_exactly_the_face(init):
    """The `if TYPE_CHECKING:` imports of a face name the same modules and names as its face() table."""
    table = face_table(init)
    seen = {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                for alias in imp.names:
                    home = f"{module_name(init)}.{imp.module}" if imp.module else module_name(init)
                    seen[alias.name] = home if imp.module else f"{home}.{alias.name}"
    assert seen == {name: home for name, home in table.items()}


def test_no_run_of_three_blank_lines():
    """Two blank lines at most anywhere in the code (pycodestyle's E303; ruff checks it only in preview)."""
    root = PACKAGE.parents[1]
    runs = [f"{path.relative_to(root)}:{text[:match.start()].count(chr(10)) + 2}"
            for folder in ("src", "tests", "benchmarks") for path in sorted((root / folder).rglob("*.py"))
            for text in [path.read_text()] for match in re.finditer(r"\n\n\n\n", text)]
    assert not runs, f"three or more blank lines at {', '.join(runs)}"
