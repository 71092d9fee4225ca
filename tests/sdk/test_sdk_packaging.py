"""The SDK stands alone: imports and works with torch blocked, and builds a wheel of llmengine/ only."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk"

NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import llmengine
    from llmengine import Completion
    assert llmengine.__file__.startswith(sys.argv[1]), llmengine.__file__
    response = Completion.create(model_name="echo", prompt="hi", max_new_tokens=2)
    assert response.outputs[0].text == "I scream", response
    ours = {"llmengine_runtime", "numpy", "triton"} & {m.split(".")[0] for m in sys.modules}
    assert not ours, ours
    print("ok")
""")


def test_imports_and_runs_without_torch(fake):
    env = {**os.environ, "PYTHONPATH": str(SDK_DIR), "LLM_ENGINE_BASE_PATH": fake.url}
    env.pop("SCALE_API_KEY", None)
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(SDK_DIR)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert len(fake.hits) == 1  # importing made no request; the one call made one


@pytest.mark.slow  # builds a wheel
def test_wheel_builds_and_holds_only_llmengine(tmp_path):
    src = tmp_path / "sdk"
    shutil.copytree(SDK_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", str(src), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("llmengine_sdk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names}
    assert {p for p in packages if not p.endswith(".dist-info")} == {"llmengine"}
    expected = {"__init__", "api_engine", "completion", "data_types", "errors", "http_client", "model",
                "params", "sse"}
    assert {f"llmengine/{m}.py" for m in expected} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = sorted(line.split()[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert [re.match(r"[\w.-]+", r).group() for r in requires] == ["httpx", "pydantic"]
