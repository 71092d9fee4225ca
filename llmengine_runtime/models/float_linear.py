"""Float projection weights (bf16, fp16 or fp32) in the layout our C++ product reads, with fp32 activations.

`--dtype bfloat16` (or float16) on the CPU loads a checkpoint this way when our C++ kernels are built: every projection
keeps its weights in that dtype, eight rows interleaved (kernels/cpu/float_interleaved.cpp), and the rest of the model
(norms, embedding, residual stream, attention) computes in fp32, as llama.cpp does with a BF16 GGUF. The fused C++ step
then runs such a model as it runs a quantized one, and its eager blocks call the same product (`float_linear`), so both
give the same numbers. A bf16 product rounds its activations to bf16 (the `vdpbf16ps` instruction's operands); fp16 and
fp32 products take them as they are.

Layout: w `[N / 8, K4 / 4, 32]` with `[g, c, 4j + i] = W[8g + j, 4c + i]`, K4 = K rounded up to 4, zeros past K.
Where the CPU runs bf16 products on AMX tiles (`amx_bf16_tiles()`: Sapphire Rapids and later, LLMENGINE_AMX not 0 when
the weights load), bf16 weights with N a multiple of 16 are laid out as the tiles' B operand instead (`tile_bf16`,
kernels/cpu/bf16_amx.cpp): `[N / 16, K32 / 32, 512]` with `[t, u, 32r + 2n + h] = W[16t + n, 32u + 2r + h]`, and
every product of them, whatever the batch, runs on the tiles (their own summation order: other numbers than the
vector path's, the same for any batch). The tensor is kept as its raw bits (int16 for bf16/fp16) so that
`model.to(dtype)` leaves it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.layers import Linear

GROUP = 8
TILE_ELEMS = 512  # bf16 values in one AMX B tile (16 k pairs x 16 columns)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interleave_float(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[N, K]` (N a multiple of 8) -> `[N / 8, K4 / 4, 32]` of `dtype`."""
    n, k = weight.shape
    if n % GROUP:
        raise ValueError(f"interleaving takes N a multiple of 8, got a weight of {tuple(weight.shape)}")
    k4 = -(-k // 4) * 4
    w = torch.zeros(n, k4, dtype=dtype)
    w[:, :k] = weight.detach().to(dtype)
    return w.reshape(n // GROUP, GROUP, k4 // 4, 4).permute(0, 2, 1, 3).reshape(n // GROUP, k4 // 4, 32).contiguous()


def deinterleave_float(w: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `interleave_float` (or of `tile_bf16`): `[N, K]` in the weights' dtype."""
    if w.shape[-1] == TILE_ELEMS:
        tiles, ktiles, _ = w.shape
        return w.reshape(tiles, ktiles, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(tiles * 16, ktiles * 32)[:, :k]
    groups, chunks, _ = w.shape
    return w.reshape(groups, chunks, GROUP, 4).permute(0, 2, 1, 3).reshape(groups * GROUP, chunks * 4)[:, :k]


def tile_bf16(weight: torch.Tensor) -> torch.Tensor:
    """`[N, K]` (N a multiple of 16) -> bf16 `[N / 16, K32 / 32, 512]`, AMX tiles' B operand (module docstring)."""
    n, k = weight.shape
    if n % 16:
        raise ValueError(f"AMX tiles take N a multiple of 16, got a weight of {tuple(weight.shape)}")
    k32 = -(-k // 32) * 32
    w = torch.zeros(n, k32, dtype=torch.bfloat16)
    w[:, :k] = weight.detach().to(torch.bfloat16)
    return w.reshape(n // 16, 16, k32 // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(n // 16, k32 // 32, TILE_ELEMS) \
        .contiguous()


def amx_bf16_tiles() -> bool:
    """Whether bf16 products run on AMX tiles here (our kernels built for a CPU with AMX-BF16, AMX on)."""
    return cpu_kernels.available() and torch.ops.llmengine_cpu.amx_bf16_tiles()


def layout_float(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layout our product reads `weight` in: AMX tiles for bf16 where they run and N allows, else interleaved."""
    if dtype == torch.bfloat16 and weight.shape[0] % 16 == 0 and amx_bf16_tiles():
        return tile_bf16(weight)
    return interleave_float(weight, dtype)


class FloatLinear(nn.Module):
    """`y = x @ W.T + b` with W in `weight_dtype`, interleaved (module docstring); x and y fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype) -> None:
        super().__init__()
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"FloatLinear keeps weights in one of {WEIGHT_DTYPES}, not {weight_dtype}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight_dtype
        rows = layout_float(weight, weight_dtype)
        bits = rows.view(torch.int16) if weight_dtype != torch.float32 else rows.view(torch.int32)
        self.register_buffer("w_bits", bits)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def tiles(self) -> bool:
        """Whether the weights are laid out as AMX bf16 tiles (else eight rows interleaved)."""
        return self.w_bits.shape[-1] == TILE_ELEMS

    @property
    def w_rows(self) -> torch.Tensor:
        """The weights in their dtype and layout (a view of `w_bits`)."""
        return self.w_bits.view(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.llmengine_cpu.float_linear(x.reshape(-1, self.in_features), self.w_rows, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weights `[N, K]` as fp32."""
        return deinterleave_float(self.w_rows, self.in_features).float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_dtype={str(self.weight_dtype).removeprefix('torch.')}, bias={self.bias is not None}, "
                f"layout={'amx tiles' if self.tiles else 'interleaved'}")


def float_weights_apply(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `float_weights` would take this model: our C++ kernels built, weights of `dtype` on the CPU, every
    projection's N a multiple of 8 and no tensor parallelism."""
    if dtype not in (torch.bfloat16, torch.float16) or not cpu_kernels.available() or getattr(model, "tp", None):
        return False
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return bool(linears) and all(m.weight.device.type == "cpu" and m.out_features % GROUP == 0 for m in linears)


def float_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every Linear by a FloatLinear keeping `dtype` weights, give a tied head its own (`quantized_head`, the
    head `compute_logits` uses first), then make everything else fp32. In place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, FloatLinear(m.weight, m.bias, dtype))
    if getattr(model, "lm_head", False) is None:
        model.quantized_head = FloatLinear(model.embed.weight, None, dtype)
    model.to(torch.float32)
