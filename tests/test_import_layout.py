"""The package's import graph: no cycles between sub-packages, none at import time between
modules, and configuration that does not reach into the data layer. Read from the source with
ast, so a lazy import inside a function counts for the package graph too."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import hybridmim

ROOT = Path(hybridmim.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("hybridmim",) + path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The project modules ``path`` imports; ``from pkg import submodule`` counts as the
    submodule only."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
    return found


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_the_graph_is_read():
    # Guards the tests below against passing on an empty graph.
    edges = {m: _imports(p, top_level_only=False) for m, p in MODULES.items()}
    assert "hybridmim.dataset_catalog" in edges["hybridmim.config"]
    assert "hybridmim.data.sources.convert.common" in edges["hybridmim.data.sources.convert.brats"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) is not None


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        here = _package(module)
        for target in _imports(path, top_level_only=False):
            there = _package(target)
            # A package and its own sub-packages are one unit here (a parent re-exports children).
            if not (there.startswith(here + ".") or here.startswith(there + ".") or here == there):
                graph.setdefault(here, set()).add(there)
    assert _cycle(graph) is None, f"sub-packages import each other in a cycle: {_cycle(graph)}"


def test_no_import_time_cycle_between_modules():
    graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    assert _cycle(graph) is None, f"modules import each other at import time: {_cycle(graph)}"


@pytest.mark.parametrize("module", ["hybridmim.config", "hybridmim.dataset_catalog"])
def test_configuration_does_not_reach_into_the_data_layer(module):
    reached = {t for t in _imports(MODULES[module], top_level_only=False)
               if t == "hybridmim.data" or t.startswith("hybridmim.data.")}
    assert not reached, f"{module} imports the data layer: {sorted(reached)}"
