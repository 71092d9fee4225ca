"""The entry points send CPU tensors to the torch reference, and to Triton when LLMENGINE_FORCE_TRITON=1."""

import importlib

import pytest
import torch

from llmengine_runtime import kernels

ENTRY_POINTS = {  # entry point -> (module, its Triton function, CPU arguments)
    "store_kv": ("store_kv", "store_kv_triton",
                 lambda: (torch.randn(2, 1, 64), torch.randn(2, 1, 64), torch.zeros(2, 16, 1, 64),
                          torch.zeros(2, 16, 1, 64), torch.tensor([0, 17]))),
    "rms_norm": ("norms", "rms_norm_triton", lambda: (torch.randn(2, 64), torch.ones(64), 1e-6)),
    "layer_norm": ("norms", "layer_norm_triton",
                   lambda: (torch.randn(2, 64), torch.ones(64), torch.zeros(64), 1e-5)),
    "rotary": ("rotary", "rotary_triton",
               lambda: (torch.randn(2, 2, 64), torch.randn(2, 1, 64), torch.tensor([0, 1]),
                        torch.randn(4, 64))),
    "decode_attention": ("decode_attention", "decode_attention_triton",
                         lambda: (torch.randn(1, 2, 64), torch.randn(2, 16, 1, 64), torch.randn(2, 16, 1, 64),
                                  torch.tensor([[1, 0]], dtype=torch.int32),
                                  torch.tensor([3], dtype=torch.int32), 0.125)),
    "prefill_attention": ("prefill_attention", "prefill_attention_triton",
                          lambda: (torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64),
                                   torch.tensor([0, 3], dtype=torch.int32), None, None, None,
                                   torch.tensor([3], dtype=torch.int32), 0.125)),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("forced", [False, True])
def test_dispatch(monkeypatch, name, forced):
    module_name, triton_fn, make_args = ENTRY_POINTS[name]
    module = importlib.import_module(f"llmengine_runtime.kernels.{module_name}")
    calls = []
    monkeypatch.setattr(module, triton_fn, lambda *args, **kwargs: calls.append(args) or "triton")
    if forced:
        monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("LLMENGINE_FORCE_TRITON", raising=False)
    result = getattr(kernels, name)(*make_args())
    assert len(calls) == int(forced)
    if forced and name != "store_kv":
        assert result == "triton"
