"""A whole decode step of a quantized Llama in one C++ call (kernels/cpu/decode_step.cpp), on the CPU.

In eager PyTorch a batch-1 decode step of the default model is ~300 small op calls from Python (norms,
rotary, cache store, attention, activation, the projections), ~10 us each on this CPU: about as much time as
the weight products themselves. `LlamaDecoder.step` runs the same math, through the same C++ kernels the
eager path calls one by one, in a single call per step; the decoder holds the weights and KV caches, bound once.

It applies (`FusedDecode.build` returns None otherwise, and the model runs its eager blocks) when: the model
is a Llama-architecture CausalLM (RMSNorm, RoPE other than dynamic, gated SiLU MLP) without tensor
parallelism; every projection is a QuantizedLinear on our CPU kernels (`backend == "cpu"`: int4 or int8);
norms and the embedding are fp32, the KV caches fp32 or fp16; the C++ kernels are built; `LLMENGINE_FUSED_DECODE` is not
"0". Only decode steps (one new token per sequence, with a KV cache) take it; prefill stays eager. The numbers
are the eager path's: the same kernels in the same order (tests/models/test_fused_decode.py checks it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kernels import cpu as cpu_kernels
from models.attention import AttentionMetadata, KVCache
from models.layers import RMSNorm
from models.quantized_linear import QuantizedLinear


def _projection(layer: nn.Module) -> list[torch.Tensor] | None:
    """(qs, d, m, bias) of a QuantizedLinear on our CPU kernels (empty m for int8, empty bias), else None."""
    if not isinstance(layer, QuantizedLinear) or layer.backend != "cpu":
        return None
    empty = torch.empty(0)
    if layer.mode == "int4":
        qs, m = layer.w_int4, layer.m
    else:
        qs, m = layer.w_int8, empty
    return [qs, layer.d, m, empty if layer.bias is None else layer.bias.float()]


class FusedDecode:
    def __init__(self, model: nn.Module, norms: list[torch.Tensor], proj: list[torch.Tensor]):
        self.model, self.norms, self.proj = model, norms, proj
        self.decoder, self.bound_caches = None, None  # bound to the runner's KV caches at the first step
        self.decoder_step = None  # the decoder's step method, looked up once (~3 us a lookup, more when cold)

    def bind(self, kv_caches: list[KVCache]) -> None:
        attn = self.model.layers[0].attn
        self.decoder = torch.classes.llmengine_cpu.LlamaDecoder(
            self.model.embed.weight.detach(), self.norms, self.proj, [k for k, _ in kv_caches],
            [v for _, v in kv_caches], attn.num_heads, attn.num_kv_heads, attn.head_dim, self.model.norm.eps,
            attn.scale)
        self.decoder_step = self.decoder.step
        self.bound_caches = kv_caches

    @staticmethod
    def build(model: nn.Module) -> FusedDecode | None:
        config = model.config
        if (os.environ.get("LLMENGINE_FUSED_DECODE", "1") == "0" or config.arch == "falcon" or model.tp is not None
                or model.rope is None or model.rope.rope_type == "dynamic" or config.alibi
                or not cpu_kernels.available()):
            return None
        norms, proj = [], []
        for block in model.layers:
            attn, mlp = block.attn, block.mlp
            if not hasattr(mlp, "gate_up_proj") or not isinstance(block.input_layernorm, RMSNorm):
                return None
            for layer in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                tensors = _projection(layer)
                if tensors is None:
                    return None
                proj.extend(tensors)
            norms += [block.input_layernorm.weight, block.post_attention_layernorm.weight]
        norms.append(model.norm.weight)
        if not all(w.dtype == torch.float32 and w.device.type == "cpu" for w in norms + [model.embed.weight]):
            return None
        return FusedDecode(model, [w.detach() for w in norms], proj)

    def applies(self, meta: AttentionMetadata, kv_caches: list[KVCache] | None) -> bool:
        # (the caches bound already passed the check: a step runs cold, so every Python call saved counts)
        return (meta.is_decode and kv_caches is not None
                and (kv_caches is self.bound_caches or cpu_kernels.cpu_kv_caches(*kv_caches[0]))
                and not torch.compiler.is_compiling())

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[KVCache]) -> torch.Tensor:
        if kv_caches is not self.bound_caches:
            self.bind(kv_caches)
        # The engine sized the table for its max model length (RotaryEmbedding.reserve); the step checks every
        # position against it and says so if one is outside.
        return self.decoder_step(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                 self.model.rope.cos_sin_cache)
