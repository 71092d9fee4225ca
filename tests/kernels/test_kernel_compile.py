"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (bundled ptxas, no GPU needed), the
attention kernels' dots become tensor-core instructions, and shared memory fits every sm_80..sm_90 card.

The compiles run in two subprocesses without TRITON_INTERPRET (see kernel_aot.py), once per session.
"""

import json
import os
import subprocess
import sys

import pytest
from kernel_aot import DOT_KERNELS, cases

pytestmark = pytest.mark.slow  # ahead-of-time compiles for sm_80/sm_90

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_aot.py")
CASES = cases()
SMEM_LIMIT = 99 * 1024  # per-block shared memory of sm_86 / sm_89 (sm_80: 163 KiB, sm_90: 227 KiB)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMENGINE_FORCE_TRITON")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    ids = list(CASES)
    procs = [subprocess.Popen([sys.executable, SCRIPT, *ids[i::2]], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"kernel_aot.py failed:\n{err[-4000:]}"
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("case_id", list(CASES))
def test_kernel_compiles_for_gpu(compiled, case_id):
    result = compiled[case_id]
    assert result["error"] is None, result["error"]
    assert result["shared"] <= SMEM_LIMIT, f"{result['shared']} bytes of shared memory"
    if CASES[case_id][1] in DOT_KERNELS:
        assert result["mma"], "tl.dot did not lower to mma / wgmma"
