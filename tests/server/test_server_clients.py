"""Unchanged third-party clients against our server: the official LLM Engine client (scale-llm-engine, in a
subprocess, see official_client_check.py) and the `openai` client on /v1/completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, llm_body, serve

from llmengine_runtime.server.app import create_app

HERE = Path(__file__).resolve().parent
OFFICIAL = HERE.parents[1] / ".venv" / "official-client"  # pip install --no-deps --target (see the Makefile)
PROMPT = "Suggest a name for an icecream shop"

needs_official = pytest.mark.skipif(not (OFFICIAL / "llmengine").is_dir() or not (OFFICIAL / "aiohttp").is_dir(),
                                    reason=f"the official client is not installed in {OFFICIAL}")


def run_official(url: str, model: str, *args: str, api_key: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(OFFICIAL), "LLM_ENGINE_BASE_PATH": url + "/",
           "LLM_ENGINE_DISABLE_VERSION_CHECK": "true"}
    env.pop("SCALE_API_KEY", None)
    if api_key:
        env["SCALE_API_KEY"] = api_key
    proc = subprocess.run([sys.executable, str(HERE / "official_client_check.py"), model, *args], env=env,
                          capture_output=True, text=True, timeout=180, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy_text(url: str, max_new_tokens: int) -> str:
    r = httpx.post(f"{url}/v1/llm/completions-sync?model_endpoint_name={MODEL}",
                   json=llm_body(PROMPT, max_new_tokens=max_new_tokens), timeout=60)
    return r.json()["output"]["text"]


@needs_official
def test_official_client_sync_stream_async(llm_server):
    expected = greedy_text(llm_server.url, 5)
    got = run_official(llm_server.url, MODEL)
    assert got["client_file"].startswith(str(OFFICIAL))  # not our own SDK of the same package name

    sync = got["sync"]
    assert sync["output"]["text"] == expected and sync["request_id"]
    assert sync["output"]["num_completion_tokens"] == 5 and sync["output"]["num_prompt_tokens"] > 0
    assert len(sync["output"]["tokens"]) == 5
    assert "".join(t["token"] for t in sync["output"]["tokens"]) == expected
    assert got["async_sync"]["output"]["text"] == expected

    for chunks in (got["stream"], got["async_stream"]):
        assert "".join(c["output"]["text"] for c in chunks) == expected
        assert [c["output"]["finished"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1]["output"]["num_completion_tokens"] == 5
        assert len({c["request_id"] for c in chunks}) == 1 and chunks[0]["request_id"]
        assert all(c["error"] is None for c in chunks)

    assert got["model_get"]["name"] == MODEL and got["model_get"]["status"] == "READY"
    assert got["model_list"] == [MODEL]
    assert got["unknown_model"] == "NotFoundError"
    assert got["top_k_0"] == "BadRequestError"
    assert got["guided"] == "BadRequestError"


@needs_official
@pytest.mark.slow
def test_official_client_with_api_key():
    with serve(create_app({"fake": FakeEngine()}, api_key="k-123")) as live:
        got = run_official(live.url, "fake", api_key="k-123")
        assert got["sync"]["output"]["text"] == " w0 w1 w2 w3 w4"
        assert "".join(c["output"]["text"] for c in got["stream"]) == " w0 w1 w2 w3 w4"
        assert run_official(live.url, "fake", "wrong-key", api_key="k-124") == {"wrong_key": "UnauthorizedError"}


def test_openai_client_completions(llm_server):
    expected = greedy_text(llm_server.url, 5)
    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    [choice] = r.choices
    assert choice.text == expected and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == 5 and "".join(choice.logprobs.tokens) == expected
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5

    stream = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5

    ids = r.usage.prompt_tokens
    by_ids = client.completions.create(model=MODEL, prompt=llm_server.engine.tokenizer.encode(PROMPT),
                                       max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == expected and by_ids.usage.prompt_tokens == ids

    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=1, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="best_of=3 is not supported"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=1, n=2, best_of=3)


def test_openai_raw_stream_ends_with_done(llm_server):
    r = httpx.post(llm_server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3,
                                                             "temperature": 0, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
