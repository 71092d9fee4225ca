"""Kernels behind one entry point each: Triton on CUDA; on the CPU our C++ kernels (kernels/cpu/) for fp32, else the
plain-torch reference."""

from llmengine_runtime.kernels.activation import gelu, silu_and_mul
from llmengine_runtime.kernels.decode_attention import decode_attention
from llmengine_runtime.kernels.norms import layer_norm, rms_norm
from llmengine_runtime.kernels.prefill_attention import prefill_attention
from llmengine_runtime.kernels.rotary import rotary
from llmengine_runtime.kernels.store_kv import store_kv

__all__ = ["gelu", "silu_and_mul", "decode_attention", "layer_norm", "prefill_attention", "rms_norm", "rotary",
           "store_kv"]
