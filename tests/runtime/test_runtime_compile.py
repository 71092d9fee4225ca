"""The torch.compile'd decode step gives the same tokens as the eager one."""

from __future__ import annotations

import pytest

from runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow  # torch.compile


def test_compiled_decode_equals_eager(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tiny_dir("llama-gqa-tied-bias")
    prompts = [[5, 9, 3, 7, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56], [60]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = LLM(folder, device="cpu", kv_cache_gib=0.01).generate(prompts, params, progress=False)
    compiled_llm = LLM(folder, device="cpu", kv_cache_gib=0.01, compile=True)
    assert compiled_llm.engine.runner.decode_forward is not compiled_llm.engine.model.forward
    compiled = compiled_llm.generate(prompts, params, progress=False)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]
    assert compiled_llm.engine.block_manager.num_used == 0
