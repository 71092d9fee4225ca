"""A tiny Llama and tiny Falcons run end to end through the Triton kernels (interpreted on CPU) and agree
with the torch-reference path: logits of a packed prefill, then greedy decoding over a paged cache."""

from __future__ import annotations

import importlib

import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import parse_config
from tests.reference_generate import generate

CONFIGS = {
    "llama-gqa": dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=256, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "falcon-mqa": dict(architectures=["FalconForCausalLM"], vocab_size=96, hidden_size=256, num_hidden_layers=2,
                       num_attention_heads=4, multi_query=True, parallel_attn=True, alibi=False),
    "falcon-rw-alibi": dict(architectures=["FalconForCausalLM"], vocab_size=96, hidden_size=256,
                            num_hidden_layers=2, num_attention_heads=4, multi_query=False, parallel_attn=False,
                            bias=True, alibi=True),
}
# (module, function): kernels/__init__ re-exports the entry points under the modules' own names
TRITON_FUNCTIONS = [(importlib.import_module(f"llmengine_runtime.kernels.{module}"), fn) for module, fn in [
    ("store_kv", "store_kv_triton"), ("prefill_attention", "prefill_attention_triton"),
    ("decode_attention", "decode_attention_triton"), ("rotary", "rotary_triton"),
    ("norms", "rms_norm_triton"), ("norms", "layer_norm_triton")]]


def prefill_logits(model: CausalLM, prompts: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts([len(p) for p in prompts])))


@pytest.mark.slow  # whole models through the Triton interpreter
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_through_triton_equals_reference(name, monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(parse_config(CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 13, 17, 19, 23, 29, 31, 37], [40, 41], [50]]
    expected_logits = prefill_logits(model, prompts)
    expected = generate(model, prompts, 4, block_size=16)

    calls: set[str] = set()
    for module, fn_name in TRITON_FUNCTIONS:
        fn = getattr(module, fn_name)
        monkeypatch.setattr(module, fn_name, lambda *a, _fn=fn, _n=fn_name, **k: calls.add(_n) or _fn(*a, **k))
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    assert (prefill_logits(model, prompts) - expected_logits).abs().max() < 1e-4
    assert generate(model, prompts, 4, block_size=16) == expected
    used = {"store_kv_triton", "prefill_attention_triton", "decode_attention_triton"}
    used |= {"layer_norm_triton"} if name.startswith("falcon") else {"rms_norm_triton"}
    used |= set() if "alibi" in name else {"rotary_triton"}
    assert used <= calls
