"""A tiny float Llama (GQA) through the Triton kernels under `--deterministic` (interpreted on CPU, compiled on
CUDA): a sequence's logits at every position are bit-identical (`==`) whether its prompt ran alone, beside another
prompt, in chunks beside another sequence's decode step, without a cache, or position by position as decode steps.
The float products (fixed-tile matmul), attention (fixed key splits), norms and rotary all take part. The five ways
are benchmarks/gpu_check_deterministic.py's, which `make gpu-check` runs on a larger model on a GPU."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.benchmarks.gpu_check_deterministic import differences, sequence_logits_ways
from llmengine_runtime.kernels.deterministic import ENV, set_deterministic
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import parse_config

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
A = [5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53]  # 21 tokens
B = [60, 61, 62, 63, 64, 65, 66, 67, 68]


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    model = CausalLM(parse_config(CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device)


@pytest.fixture
def deterministic_triton(monkeypatch):
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    monkeypatch.setenv(ENV, "0")  # restored after the test, as set_deterministic writes it
    set_deterministic(True)
    yield
    set_deterministic(False)


@pytest.mark.slow  # a whole model through the Triton interpreter, five times
def test_rows_are_bit_identical_however_the_prompt_is_batched(model, device, deterministic_triton):
    ways = sequence_logits_ways(model, A, B, device, torch.float32, chunk=8, prompt=5, block_size=8)
    assert ways["alone"].shape == (len(A), 96) and torch.isfinite(ways["alone"]).all()
    assert set(ways) == {"alone", "beside b", "chunked", "no cache", "decode steps"}
    assert differences(ways) == {name: 0.0 for name in ways if name != "alone"}


@pytest.mark.slow  # the whole gpu-check case, at tiny sizes, through the interpreter
def test_gpu_check_case_runs_and_passes_at_tiny_sizes(device, monkeypatch):
    """`make gpu-check`'s --deterministic case (benchmarks/gpu_check_deterministic.py) end to end on tiny shapes:
    every exact check passes, the switch is off again after, and the contrast row (default paths) is there."""
    from llmengine_runtime.benchmarks.gpu_check_deterministic import TINY, check_deterministic
    from llmengine_runtime.kernels.deterministic import deterministic

    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    monkeypatch.setenv(ENV, "0")
    fp32 = {name: {**sizes, "dtype": torch.float32} for name, sizes in TINY.items()}
    result = check_deterministic(device, fp32)
    assert result["ok"], result["detail"]
    assert not deterministic() and len(result["rows"]) == 6
    assert "default paths" in result["detail"] and "FAIL" not in result["detail"]
