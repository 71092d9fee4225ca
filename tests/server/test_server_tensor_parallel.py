"""`llmengine serve --tensor-parallel-size 2` with the default model: one rank's greedy text through the server,
/readyz failing once a worker dies, and no process left behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import psutil
import pytest
from live_server import MODEL, wait_for
from test_server_serve_cli import free_port, start_serve

from llmengine_runtime.runtime import LLM, SamplingParams

PROMPT = "Suggest a name for an icecream shop"


def spawned_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_default_model_on_two_ranks(default_model_dir):
    one_rank = LLM(default_model_dir, device="cpu", kv_cache_gib=0.05)  # fp32 float weights, as the server's below
    expected = one_rank.generate([PROMPT], SamplingParams(max_new_tokens=24), progress=False)[0].text
    del one_rank
    port = free_port()
    proc, lines = start_serve(["--port", str(port), "--tensor-parallel-size", "2", "--quantize", "none",
                               "--kv-cache-gib", "0.25"], dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: any("llmengine: serving" in line for line in lines) or proc.poll() is not None,
                        timeout=300), "".join(lines)
        workers = spawned_workers(proc.pid)
        assert len(workers) == 1, workers
        r = httpx.post(f"{url}/v1/llm/completions-sync?model_endpoint_name={MODEL}", timeout=120,
                       json={"prompt": PROMPT, "max_new_tokens": 24, "temperature": 0})
        assert r.status_code == 200 and r.json()["output"]["text"] == expected, r.text
        assert httpx.get(url + "/readyz").status_code == 200

        workers[0].kill()
        assert wait_for(lambda: httpx.get(url + "/readyz").status_code == 503, timeout=10)
        assert "exited" in httpx.get(url + "/readyz").json()["detail"]
        r = httpx.post(f"{url}/v1/llm/completions-sync?model_endpoint_name={MODEL}", timeout=30,
                       json={"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0})
        assert r.status_code == 503 and "tensor-parallel worker" in r.json()["detail"], r.text
        assert httpx.get(url + "/healthz").status_code == 503  # an orchestrator restarts it
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, alive
