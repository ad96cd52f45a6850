"""The core's floors: which part of ``clic/`` may import which, read from the source with ``ast``
(nothing is imported). A part is a folder of ``clic/`` (``data``, ``transforms``, ...) or a
top-level module (``scorer``, ``embed``, ...); ``clic`` is the package's ``__init__``. Every import
counts, lazy ones inside functions and ``TYPE_CHECKING`` ones included.

Imports go down the floors only, so no two parts import each other, and MLflow stays at the edge:
one module (:mod:`clic.model_uri`) imports it, lazily and through its public API; Prefect, DVC and
great-expectations never. ``clic study table`` is the one command that reads the pipeline's
tracking side: ``clic/cli.py`` imports ``stages`` inside that command only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

CLIC = Path(__file__).resolve().parents[1] / "clic"

FLOORS: list[set[str]] = [  # lowest first; a part imports parts of lower floors only
    {"config", "atomic", "cores", "losses", "distributed", "model_uri"},  # third-party imports only
    {"data"},  # images, tables, corpora, shards
    {"transforms"},  # views (augmentations), cut from images that data/ reads
    {"models"},  # backbones, the methods' modules, probe heads
    {"methods"},  # one file per method: its views, model, rules (the registry)
    {"params"},  # params.yaml read and merged, over config and the registered methods
    {"engine"},  # training loop, checkpoints, schedules
    {"embed"},  # frozen features of a checkpoint
    {"scorer"},  # encoder + head in one file
    {"evaluation"},  # probes, metrics, transfer
    {"pretrain"},
    {"cli", "clic"},  # entry points
]
TRACKER = "mlflow"
EDGE = "model_uri.py"  # the one module that imports the tracker
NEVER = ("prefect", "dvc", "great_expectations")
PIPELINE = ("stages", "flows")  # the thin layers around the core
PIPELINE_DOOR = "cli.py"  # imports stages/, inside the commands that need it only


def _modules() -> list[Path]:
    return sorted(CLIC.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(CLIC)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "clic" if rel.stem == "__init__" else rel.stem


def _imports(path: Path) -> Iterator[tuple[ast.stmt, str, list[str]]]:
    """(statement, absolute module, imported names) of every import in ``path``."""
    package = ".".join(("clic", *path.relative_to(CLIC).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield node, module, [a.name for a in node.names]


def _targets(module: str, names: list[str]) -> set[str]:
    """The parts of clic/ that ``from module import names`` (or ``import module``) reaches."""
    parts = module.split(".")
    if parts[0] != "clic":
        return set()
    if len(parts) > 1:
        return {parts[1]}
    found = {n for n in names if (CLIC / f"{n}.py").is_file() or (CLIC / n).is_dir()}
    return found | ({"clic"} if set(names) - found or not names else set())


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _modules():
        src = _part(path)
        edges = graph.setdefault(src, set())
        for _, module, names in _imports(path):
            edges |= _targets(module, names) - {src}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _top_level(path: Path) -> set[int]:
    """Line numbers of the imports that run when the module is imported (not inside a def)."""
    tree = ast.parse(path.read_text(), str(path))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f)}
    return {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in inside}


def _rel(path: Path) -> str:
    return str(path.relative_to(CLIC))


def test_the_parser_sees_the_imports() -> None:
    """Guards the other tests against passing on a parser that finds nothing."""
    graph = _graph()
    assert {"data", "transforms", "models", "engine", "evaluation", "scorer", "embed"} <= set(graph)
    assert "config" in graph["models"] and "data" in graph["transforms"] and "embed" in graph["evaluation"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_parts_of_clic() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"parts of clic/ that import each other (directly or around a loop): {cycles}"


def test_every_part_has_a_floor_and_imports_go_down() -> None:
    floor = {part: i for i, parts in enumerate(FLOORS) for part in parts}
    graph = _graph()
    assert not set(graph) - set(floor), f"give these parts of clic/ a floor in FLOORS: {set(graph) - set(floor)}"
    up = sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if floor[dst] >= floor[src])
    assert not up, f"imports that do not go down the floors (lowest first: {FLOORS}): {up}"


def test_one_module_imports_mlflow_lazily_through_its_public_api() -> None:
    importers: dict[str, list[int]] = {}
    private: list[str] = []
    for path in _modules():
        aliases = set()
        for node, module, names in _imports(path):
            if module.split(".")[0] != TRACKER:
                continue
            importers.setdefault(_rel(path), []).append(node.lineno)
            if any(p.startswith("_") for p in module.split(".")) or any(n.startswith("_") for n in names):
                private.append(f"{_rel(path)}:{node.lineno} {module} {names or ''}")
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names}
        for attr in ast.walk(ast.parse(path.read_text())):  # mlflow.tracking._x.y without an import of it
            chain, root = [], attr
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases and any(a.startswith("_") for a in chain):
                private.append(f"{_rel(path)}:{root.lineno} {root.id}.{'.'.join(reversed(chain))}")
    assert set(importers) == {EDGE}, f"modules of clic/ that import {TRACKER}: {importers} (only {EDGE} may)"
    eager = _top_level(CLIC / EDGE) & set(importers[EDGE])
    assert not eager, f"{EDGE} imports {TRACKER} at import time (lines {sorted(eager)}); import it in the function"
    assert not private, f"private {TRACKER} modules or names (not its public API): {private}"


@pytest.mark.parametrize("library", NEVER)
def test_the_core_never_imports_pipeline_libraries(library: str) -> None:
    found = [f"{_rel(p)}:{n.lineno}" for p in _modules() for n, module, _ in _imports(p)
             if module.split(".")[0] == library]
    assert not found, f"clic/ imports {library}: {found}"


def test_only_the_cli_reaches_the_pipeline_layers_and_only_lazily() -> None:
    found = {_rel(p): [n.lineno for n, module, _ in _imports(p) if module.split(".")[0] in PIPELINE]
             for p in _modules()}
    found = {k: v for k, v in found.items() if v}
    assert set(found) <= {PIPELINE_DOOR}, f"modules of clic/ that import {PIPELINE}: {found}"
    eager = _top_level(CLIC / PIPELINE_DOOR) & set(found.get(PIPELINE_DOOR, []))
    assert not eager, f"{PIPELINE_DOOR} imports {PIPELINE} at import time (lines {sorted(eager)})"
