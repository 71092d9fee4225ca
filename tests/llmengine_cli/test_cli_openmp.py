"""The `llmengine` command (and the benchmarks) make OpenMP threads wait passively, set before torch loads (libgomp
reads its environment then), unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import os, sys
class SeeTorchLoad:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, SeeTorchLoad())
import {module}
"""


def torch_sees(module: str, policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=120, check=True).stdout
    return out.splitlines()[0]


@pytest.mark.slow  # two fresh interpreters import torch
@pytest.mark.parametrize("module", ["llmengine_cli", "benchmarks.decode"])
def test_passive_unless_the_user_chose(module):
    assert torch_sees(module, None) == "at torch import: PASSIVE"
    assert torch_sees(module, "ACTIVE") == "at torch import: ACTIVE"
