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
