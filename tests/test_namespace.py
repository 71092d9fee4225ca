"""No other distribution's module can stand in for ours: with decoy top-level `kernels`, `models`, `runtime`, `server`
and `benchmarks` packages first on sys.path (as Hugging Face's `kernels` landed in site-packages beside
transformers 5.25), the server imports and serves a generation, and no decoy was ever imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.models.tiny import write_tiny_llama

DECOYS = ("kernels", "models", "runtime", "server", "benchmarks")

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])  # the decoys shadow anything of those names installed or in the cwd
    from fastapi.testclient import TestClient

    from llmengine_runtime.runtime import AsyncEngine
    from llmengine_runtime.server.app import create_app

    engine = AsyncEngine(sys.argv[2], name="tiny", kv_cache_gib=0.01)
    try:
        with TestClient(create_app({"tiny": engine})) as client:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                    "temperature": 0, "ignore_eos": True})
    finally:
        engine.shutdown()
    print(json.dumps({"status": r.status_code, "body": r.json(),
                      "modules": sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3].split(","))}))
""")


@pytest.mark.slow  # a fresh interpreter imports torch and the server, and loads a model
def test_decoy_top_level_packages_shadow_nothing(tmp_path: Path):
    decoys, imported = tmp_path / "decoys", tmp_path / "imported"
    imported.mkdir()
    for name in DECOYS:
        (decoys / name).mkdir(parents=True)
        (decoys / name / "__init__.py").write_text(
            f"open({str(imported / name)!r}, 'w').close()\n"
            f"raise ImportError('the decoy top-level package {name!r} was imported')\n")
    model = write_tiny_llama(tmp_path / "tiny", vocab_size=64)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(decoys), str(model), ",".join(DECOYS)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == 200, result["body"]
    assert result["body"]["usage"]["completion_tokens"] == 4
    assert result["modules"] == []
    assert sorted(p.name for p in imported.iterdir()) == []  # not even an import that someone caught
