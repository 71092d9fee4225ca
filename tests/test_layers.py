"""The layers of docs/architecture.md: each subpackage of llmengine_runtime imports only the subpackages below it,
importing the server loads neither the benchmarks nor the CLI, and none of our import names can be shadowed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = "llmengine_runtime"
LAYERS = {"kernels", "models", "runtime", "server", "benchmarks", "cli"}
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "runtime": {"models", "kernels"},
    "server": {"runtime", "models", "kernels"},
    "benchmarks": {"runtime", "models", "kernels"},
    "cli": LAYERS | {"llmengine"},
}


OLD_TOP_LEVEL = {"kernels", "models", "runtime", "server", "benchmarks", "llmengine_cli"}


def imports(path: Path) -> list[str]:
    """Every absolute module name `path` imports, at any depth of the file (`from a import b` gives a.b too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def imported_layers(folder: Path) -> dict[str, set[str]]:
    """Our layers (and `llmengine`, the SDK) that each file of `folder` imports."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == TOP and len(parts) > 1 and parts[1] in LAYERS:
                names.add(parts[1])
            elif parts[0] == "llmengine":
                names.add("llmengine")
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_upward_import(layer):
    wrong = {path: sorted(names - ALLOWED[layer] - {layer})
             for path, names in imported_layers(REPO / TOP / layer).items()}
    assert not {path: names for path, names in wrong.items() if names}


def test_sdk_imports_only_itself():
    found = imported_layers(REPO / "sdk" / "llmengine")
    wrong = {path: names for path, names in found.items() if names - {"llmengine"}}
    assert not wrong


def test_no_code_imports_an_old_top_level_name():
    """`kernels`, `models`, ... are other distributions' names now (Hugging Face's `kernels`): importing one would
    load theirs, or nothing."""
    wrong = {}
    for folder in (TOP, "tests", "sdk"):
        for path in (REPO / folder).rglob("*.py"):
            bad = sorted({n for n in imports(path) if n.split(".")[0] in OLD_TOP_LEVEL})
            if bad:
                wrong[str(path.relative_to(REPO))] = bad
    assert not wrong


def test_the_repo_root_shadows_no_distribution():
    """From the repo root (on sys.path first when running `python -m ...` there), only our own names import."""
    importable = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists() or p.suffix == ".py"}
    assert importable <= {TOP, "setup.py"}, importable


@pytest.mark.slow  # a fresh interpreter imports torch and the server
def test_importing_the_server_loads_no_benchmark_or_cli_module():
    code = (f"import sys, {TOP}.server.app, {TOP}.server.serve; "
            f"print(sorted(m for m in sys.modules if m.startswith(('{TOP}.benchmarks', '{TOP}.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def module_graph(folder: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (at any depth, TYPE_CHECKING and function-level imports included;
    `from a import b` is a.b when that is a module, else a)."""
    modules = {}
    for path in (REPO / TOP).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        if not path.is_relative_to(folder):
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (its strongly connected components of two modules or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_import_cycle(layer):
    """No module of a layer imports, however indirectly or lazily, one that imports it back (runtime's runner and
    its buffers, the TP workers, the engine and its warm-up, speculation and the engine once did)."""
    assert cycles(module_graph(REPO / TOP / layer)) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
