"""The torch.compile'd decode step gives the same tokens as the eager one."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.compile_warmup import persistent_compile_cache


@pytest.mark.slow  # torch.compile
def test_compiled_decode_equals_eager(tiny_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    caplog.set_level(logging.INFO, logger="runtime")
    folder = tiny_dir("llama-gqa-tied-bias")
    prompts = [[5, 9, 3, 7, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56], [60]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = LLM(folder, device="cpu", kv_cache_gib=0.01).generate(prompts, params, progress=False)
    # With the thread tuner (`auto`), whose trials switch torch's thread count (2 <-> 1), which Dynamo guards on.
    torch.set_num_threads(2)  # (this folder's tests run on one; the module fixture restores it)
    compiled_llm = LLM(folder, device="cpu", kv_cache_gib=0.01, compile=True, cpu_threads="auto")
    assert compiled_llm.engine.runner.executor.decode_forward is not compiled_llm.engine.model.forward
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = compiled_llm.generate(prompts, params, progress=False)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]
    assert compiled_llm.engine.block_manager.num_used == 0
    # the warm-up said what it compiled, where Inductor's cache is, and how long each graph took
    compiling = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile:")]
    assert any("for 1 sequence, " in m and f"(Inductor cache: {tmp_path / 'inductor'})" in m for m in compiling)
    threads = compiled_llm.engine.thread_tuner.candidates
    for n in threads:  # each count the tuner may pick was warmed up
        assert any(m.startswith(f"torch.compile: the decode step for 2 and more sequences, {n} thread(s) is ready")
                   for m in compiling)
    assert any((tmp_path / "inductor").iterdir())  # Inductor wrote its cache where we pointed it
    # Nothing compiled in a request after the warm-up: not for a 1-block prompt (a size-1 block-table dimension
    # would be specialised), nor alone, nor beside others, nor in the tuner's trials with another thread count.
    compiled_llm.generate([[7, 8, 9]], SamplingParams(max_new_tokens=4, ignore_eos=True), progress=False)
    compiled_llm.generate([[7, 8, 9], [4] * 40, [5]], SamplingParams(max_new_tokens=4, ignore_eos=True),
                          progress=False)
    tuner = compiled_llm.engine.thread_tuner
    assert tuner.candidates == [2, 1] and tuner.samples.get(1)  # a trial ran decode steps with 1 thread
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_persistent_compile_cache_is_ours_unless_the_operator_chose(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LLMENGINE_CACHE_DIR", str(tmp_path / "cache"))
    assert persistent_compile_cache() == tmp_path / "cache" / "torch_compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch_compile")
    assert (tmp_path / "cache" / "torch_compile").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == tmp_path / "mine"
