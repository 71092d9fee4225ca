"""Kernels behind one entry point each: Triton on CUDA, the plain-torch reference on CPU."""

from kernels.decode_attention import decode_attention
from kernels.norms import layer_norm, rms_norm
from kernels.prefill_attention import prefill_attention
from kernels.rotary import rotary
from kernels.store_kv import store_kv

__all__ = ["decode_attention", "layer_norm", "prefill_attention", "rms_norm", "rotary", "store_kv"]
