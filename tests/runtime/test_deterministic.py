"""`deterministic=True` / `--deterministic`: accepted by the engine, `llmengine serve` and `llmengine generate`; on
the CPU it turns on the (Triton-only) switch and changes no number, since our C++ kernels are batch-invariant
anyway. The CUDA paths it selects are tested in tests/kernels/test_kernel_deterministic*.py (interpreted here)
and by `make gpu-check` on a GPU."""

from __future__ import annotations

import argparse

import pytest

from llmengine_runtime.kernels import deterministic as switch
from llmengine_runtime.runtime import LLM, SamplingParams


@pytest.fixture
def restore_switch(monkeypatch):
    monkeypatch.setenv(switch.ENV, "0")
    yield
    switch.set_deterministic(False)


def test_serve_and_generate_take_the_flag():
    from llmengine_runtime.cli import build_parser
    from llmengine_runtime.server.serve import add_serve_args

    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    assert serve.parse_args(["--deterministic"]).deterministic and not serve.parse_args([]).deterministic
    cli = build_parser()
    assert cli.parse_args(["generate", "--prompt", "x", "--deterministic"]).deterministic
    assert not cli.parse_args(["generate", "--prompt", "x"]).deterministic


def test_cpu_engine_accepts_it_and_computes_the_same(tiny_dir, cache_gib, restore_switch):
    folder = tiny_dir("llama-gqa-tied-bias")
    prompts = [[5, 9, 3, 7, 1], [40, 41, 42]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, return_token_log_probs=True)
    gib = cache_gib(folder, 16, 16)
    plain = LLM(folder, device="cpu", kv_cache_gib=gib).generate(prompts, params, progress=False)
    assert not switch.deterministic()
    llm = LLM(folder, device="cpu", kv_cache_gib=gib, deterministic=True)
    assert switch.deterministic() and switch.os.environ[switch.ENV] == "1"  # workers started later inherit it
    same = llm.generate(prompts, params, progress=False)
    assert [o.token_ids for o in same] == [o.token_ids for o in plain]
    assert [o.log_probs for o in same] == [o.log_probs for o in plain]
