"""`llmengine batch INPUT OUTPUT --model ...`: the server's batch file formats offline, through runtime.LLM.
The same prompts give the same output file as a batch job in the server (greedy, a tiny GGUF model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from llmengine_runtime.cli import main
from llmengine_runtime.models.gguf import convert_gguf
from llmengine_runtime.runtime import AsyncEngine
from llmengine_runtime.server.app import create_app
from tests.models.test_gguf import WORDS, write_tiny_gguf
from tests.server.live_server import serve

CONTENT = {"prompts": [" ".join(WORDS[i:i + 3]) for i in range(5)], "max_new_tokens": 5, "temperature": 0.0,
           "return_token_log_probs": True}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny-gguf")
    write_tiny_gguf(tmp / "tiny.gguf")
    return convert_gguf(tmp / "tiny.gguf", tmp / "tiny", progress=False)


def test_bad_input_is_a_one_line_error_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps({"prompts": [], "max_new_tokens": 1, "temperature": 0}))
    assert main(["batch", str(tmp_path / "in.json"), str(tmp_path / "out.json"), "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmengine batch: error: input file {tmp_path / 'in.json'}: prompts is empty; give at least one "
                   "prompt"]
    (tmp_path / "in.json").write_text("{")
    assert main(["batch", str(tmp_path / "in.json"), str(tmp_path / "out.json")]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_offline_batch_equals_the_server_batch_job(tiny_folder, tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps(CONTENT))
    rc = main(["batch", str(tmp_path / "in.json"), str(tmp_path / "offline.json"), "--model", str(tiny_folder),
               "--kv-cache-gib", "0.01"])
    assert rc == 0, capsys.readouterr().err
    offline = json.loads((tmp_path / "offline.json").read_text())
    assert len(offline) == 5 and all(o["num_completion_tokens"] == 5 or o["text"] for o in offline)

    engine = AsyncEngine(tiny_folder, name="tiny", kv_cache_gib=0.01)
    with serve(create_app({"tiny": engine}, batch_dir=tmp_path)) as live:
        body = {"input_data_path": "in.json", "output_data_path": "served.json", "model_config": {"model": "tiny"}}
        job_id = httpx.post(live.url + "/v1/llm/batch-completions", json=body).json()["job_id"]
        url = f"{live.url}/v2/batch-completions/{job_id}"
        deadline = time.monotonic() + 60
        while (job := httpx.get(url).json()["job"])["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job["status"] == "completed", job
    served = json.loads((tmp_path / "served.json").read_text())
    for a, b in zip(offline, served, strict=True):
        assert (a["text"], a["num_prompt_tokens"], a["num_completion_tokens"]) == \
            (b["text"], b["num_prompt_tokens"], b["num_completion_tokens"])
        assert [t["token"] for t in a["tokens"]] == [t["token"] for t in b["tokens"]]
        assert [t["log_prob"] for t in a["tokens"]] == pytest.approx([t["log_prob"] for t in b["tokens"]], abs=1e-4)
