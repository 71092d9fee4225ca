"""The layers of docs/architecture.md: each package imports only the packages below it, and importing the
server loads neither the benchmarks nor the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"kernels", "models", "runtime", "server", "benchmarks", "llmengine_cli", "llmengine"}
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "runtime": {"models", "kernels"},
    "server": {"runtime", "models", "kernels"},
    "benchmarks": {"runtime", "models", "kernels"},
    "sdk/llmengine": {"llmengine"},  # the SDK imports only itself
    "llmengine_cli": OURS - {"llmengine"},
}


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """Our top-level packages each file of `folder` imports (at any depth of the file)."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names & OURS
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_upward_import(package):
    wrong = {path: sorted(names - ALLOWED[package] - {package.split("/")[-1]})
             for path, names in imported_packages(REPO / package).items()}
    assert not {path: names for path, names in wrong.items() if names}


@pytest.mark.slow  # a fresh interpreter imports torch and the server
def test_importing_the_server_loads_no_benchmark_or_cli_module():
    code = ("import sys, server.app, server.serve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'llmengine_cli')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
