"""`llmengine serve --model NAME=file.gguf`: a llama GGUF served as it is, its Q4_1 weights kept as int4 (the
default `--quantize auto`), its tokenizer from the file's metadata; `--quantize none` serves it dequantized."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest
from gguf import GGMLQuantizationType
from live_server import wait_for

from tests.models.test_gguf import write_tiny_gguf
from tests.server.test_server_serve_cli import free_port, start_serve


@pytest.mark.slow
@pytest.mark.parametrize("quantize, weights", [("auto", "GGUF Q4_1 x14, Q4_1 (tied head) x1"), ("none", "float")])
def test_serve_a_gguf_file(tmp_path, quantize, weights):
    write_tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1)
    port = free_port()
    env = {**os.environ, "LLMENGINE_MODELS_DIR": str(tmp_path / "models")}
    proc, lines = start_serve(["--model", f"tiny={tmp_path / 'tiny.gguf'}", "--port", str(port),
                               "--quantize", quantize], env)
    try:
        assert wait_for(lambda: any("llmengine: serving" in line for line in lines) or proc.poll() is not None,
                        timeout=120), "".join(lines)
        assert f"tiny weights: {weights}" in "".join(lines), "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/llm/completions-sync?model_endpoint_name=tiny", timeout=60,
                       json={"prompt": "hello world", "max_new_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        output = r.json()["output"]
        assert output["num_prompt_tokens"] >= 2 and output["num_completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines)
