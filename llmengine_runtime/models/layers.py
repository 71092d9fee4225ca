"""Building blocks the model families share: norms, attention with fused QKV, the two MLPs."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmengine_runtime.kernels import gelu, layer_norm, rms_norm, rotary, silu_and_mul
from llmengine_runtime.kernels.deterministic_matmul import linear
from llmengine_runtime.models.attention import AttentionMetadata, KVCache, paged_attention
from llmengine_runtime.models.model_config import ModelConfig
from llmengine_runtime.models.packed_linear import packed_linear


class Linear(nn.Linear):
    packed_index: int | None = None  # set when the weight was moved to models.packed_linear (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_index is not None:
            y = packed_linear(x, self.packed_index, self.out_features)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)  # F.linear; under --deterministic on CUDA fixed tiles


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`norm(x)`; with `residual`, `(norm(x + residual), x + residual)`."""
        return rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (BLOOM/Falcon): a geometric series, interleaved when heads are not a power of 2."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float64)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, extra_base ** torch.arange(1, 2 * extra, 2, dtype=torch.float64)])
    return slopes.float()


class Attention(nn.Module):
    """Fused QKV projection (rows [q heads; k heads; v heads]) -> per-head q/k RMSNorm (`qk_norm`, Qwen3) -> RoPE
    or ALiBi -> paged attention (each query sees its last `window` keys when `window` > 0) -> o_proj."""

    def __init__(self, config: ModelConfig, bias: bool, out_bias: bool, qk_norm: bool = False, window: int = 0):
        super().__init__()
        self.window = window
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=out_bias)
        self.scale = self.head_dim**-0.5
        self.use_alibi = config.alibi
        self.alibi_slopes = None

    def init_alibi(self, device: torch.device | str = "cpu", slopes: torch.Tensor | None = None) -> None:
        """`slopes`: this module's heads' ALiBi slopes (a tensor-parallel rank's share); default all heads'."""
        # Scores are `scale * q.k + slope * (k_pos - q_pos)`: HF adds ALiBi before scaling, so fold it in.
        if not self.use_alibi:
            self.alibi_slopes = None
            return
        slopes = alibi_slopes(self.num_heads) if slopes is None else slopes
        self.alibi_slopes = (slopes * self.scale).to(device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # over each head's head_dim, before rotary
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        if rope is not None:
            cos_sin_cache, index = rope
            q, k = rotary(q, k, index, cos_sin_cache)
        out = paged_attention(q, k, v.contiguous(), kv_cache, meta, self.scale, self.alibi_slopes, self.window)
        return self.o_proj(out.reshape(-1, self.q_size))


class GatedMLP(nn.Module):
    """Llama: `down(silu(gate(x)) * up(x))`, gate and up fused into one matrix."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class GeluMLP(nn.Module):
    """Falcon: `dense_4h_to_h(gelu(dense_h_to_4h(x)))`."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.up_proj(x)))
