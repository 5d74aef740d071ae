"""The layers are what the README says: app -> retriever -> indexer -> models -> core.

* no module-level import cycle among dermris's modules;
* every import (module level or inside a function) points to the same layer or one below;
* ``core`` imports no torch; the store and the store-only commands never load torch;
* ``retriever`` does not import the app, the indexing pipeline, the cluster code or training.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "models", "indexer", "retriever", "app")
"""From the bottom up: a module may import its own layer and those before it."""


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for file in sorted((ROOT / layer).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["dermris." + ".".join(parts)] = file
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, file: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute names a ``from ... import ...`` refers to (modules where they are modules)."""
    if node.level:
        package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [n if n in MODULES else target for n in names]


def _imports(module: str, *, module_level_only: bool) -> set[str]:
    """Every module ``module`` imports (dermris's own and third-party names); with
    ``module_level_only``, only the imports that run when the module is imported (not inside
    functions); ``if TYPE_CHECKING:`` blocks never count."""
    file = MODULES[module]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
            module_level_only and in_function
        ):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            else:
                found.update(_resolve(module, file, node))
        inside = in_function or isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(file.read_text("utf-8")), False)
    return found


def _own(name: str) -> str | None:
    """The dermris module ``name`` is or lies in (the longest known prefix), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_the_module_map_is_found():
    assert {
        "dermris.core.errors",
        "dermris.indexer.store.reader",
        "dermris.retriever.search",
        "dermris.app.cli",
        "dermris.models.ensemble",
    } <= set(MODULES)


def test_no_module_level_import_cycle():
    graph = {
        m: {o for o in map(_own, _imports(m, module_level_only=True)) if o and o != m}
        for m in MODULES
    }
    # a package's __init__ importing its own submodules is not a cycle with them
    for m, targets in graph.items():
        graph[m] = {
            t for t in targets if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))
        }
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("module-level import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_every_import_points_down_the_layers():
    wrong = []
    for m in MODULES:
        for name in _imports(m, module_level_only=False):
            target = _own(name)
            if target is not None and _layer(target) > _layer(m):
                wrong.append(f"{m} imports {target}")
    assert not wrong, wrong


def test_core_imports_no_torch_and_nothing_above_it():
    for m in (m for m in MODULES if m.startswith("dermris.core")):
        names = _imports(m, module_level_only=False)
        assert not any(n.split(".")[0] in ("torch", "timm", "torchvision") for n in names), m
        assert all(_own(n) is None or _own(n).startswith("dermris.core") for n in names), m


def test_retriever_imports_no_app_pipeline_cluster_or_training():
    banned = (
        "dermris.app",
        "dermris.indexer.pipeline",
        "dermris.indexer.cluster",
        "dermris.indexer.coordinator",
        "dermris.indexer.blocks",
        "dermris.indexer.loader",
        "dermris.models.training",
    )
    wrong = [
        (m, n)
        for m in MODULES
        if m.startswith("dermris.retriever")
        for n in _imports(m, module_level_only=False)
        if n.startswith(banned)
    ]
    assert not wrong, wrong


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    prelude = "import sys\nsys.modules['torch'] = None  # any import of torch raises ImportError\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300
    )


def test_importing_the_store_and_the_retriever_loads_no_torch():
    code = (
        "import dermris.indexer.store, dermris.retriever.search, dermris.app.cli, dermris.core\n"
        "import dermris.retriever as r; r.Retriever, r.SearchResult\n"
        "print('ok')\n"
    )
    result = _run_without_torch(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_store_commands_and_row_queries_never_import_torch(random_store):
    """``info``, ``check --full``, ``search --row``, ``delete`` and ``compact`` on a store whose
    model they do not need run with torch unimportable."""
    path = random_store(n=30, seed=3, commit_sizes=[20, 10], faiss_files=True)
    commands = [
        ["info", str(path)],
        ["info", str(path), "--json"],
        ["check", str(path), "--full"],
        ["search", str(path), "--row", "3", "--json", "--explain"],
        ["search", str(path), "--row", "3", "--measure", "cosine"],
        ["delete", str(path), "--id", "IMG_3_0004"],
        ["compact", str(path)],
        ["rebuild", str(path)],
        ["check", str(path)],
    ]
    for args in commands:
        code = f"from dermris.app.cli import main\nmain({args!r})\n"
        result = _run_without_torch(code)
        assert result.returncode == 0, (args, result.stdout[-1000:], result.stderr[-2000:])
