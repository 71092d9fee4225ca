"""The README's SDK example, run as written against the default model: both of its completions print text, and the
stream prints what the README's comment says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_sdk_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python SDK", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_readme_sdk_example_prints_text(llm_server):
    code = readme_sdk_example()
    assert "stream=True" in code and "temperature=0" in code
    env = {**os.environ, "PYTHONPATH": str(REPO / "sdk"), "LLM_ENGINE_BASE_PATH": llm_server.url + "/"}
    env.pop("SCALE_API_KEY", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    sync_line, stream_line = run.stdout.splitlines()
    assert sync_line.strip() and stream_line.strip(), run.stdout
    promised = re.search(r'print\(\)  # "(.*)"', code)[1]
    assert stream_line == promised
