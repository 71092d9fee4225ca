"""`llmengine serve` (server.serve.run_serve) as a real process: several models by name, the banner once
ready, the API key from the environment, a clean exit on SIGINT, and a clear failure for a missing model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from live_server import wait_for
from safetensors.torch import save_file

from llmengine_runtime.server.serve import model_specs

RUN_SERVE = ("import argparse, sys; from llmengine_runtime.server.serve import add_serve_args, run_serve; "
             "p = argparse.ArgumentParser(); add_serve_args(p); sys.exit(run_serve(p.parse_args()))")
REPO = Path(__file__).resolve().parents[2]


def write_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama with no tokenizer (prompts as token ids): loads in well under a second."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, hidden, inter, layers = 128, 64, 96, 2
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.1,
               "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.1, "model.norm.weight": torch.ones(hidden)}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g) * 0.1
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], env: dict) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", RUN_SERVE, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


@pytest.mark.slow
def test_serve_two_models_with_key_from_env(tmp_path):
    folder = write_tiny_llama(tmp_path / "tiny")
    port, key = free_port(), "env-key-1"
    env = {**os.environ, "LLMENGINE_API_KEY": key}
    proc, lines = start_serve(["--model", f"alpha={folder}", "--model", f"beta={folder}", "--port", str(port)], env)
    try:
        assert wait_for(lambda: any("llmengine: serving" in line for line in lines) or proc.poll() is not None,
                        timeout=120), "".join(lines)
        banner = "".join(lines)
        assert "serving alpha, beta at http://127.0.0.1:" + str(port) in banner, banner
        assert "curl" in banner and "Completion.create" in banner and key in banner
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/readyz").json()["models"] == ["alpha", "beta"]
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=auth).json()["data"]] == ["alpha", "beta"]
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": "beta", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines)


@pytest.mark.slow
def test_serve_exits_with_an_error_for_a_missing_model(tmp_path):
    env = {**os.environ, "LLMENGINE_MODELS_DIR": str(tmp_path)}
    proc, lines = start_serve(["--model", f"ghost={tmp_path / 'nothing-here'}", "--port", str(free_port())], env)
    try:
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert code == 1 and "llmengine serve: error" in "".join(lines), "".join(lines)


def test_model_specs():
    assert model_specs([]) == [("smollm2-135m-instruct", "smollm2-135m-instruct", {})]
    assert model_specs(["a=/x/y"]) == [("a", "a", {"a": Path("/x/y")})]
    with pytest.raises(ValueError, match="one name"):
        model_specs(["a=/x", "a=/y"])
