"""The MLP activations: SiLU-and-multiply, Llama's: x `[..., 2I]` holding (gate | up) -> `silu(gate) * up` `[..., I]`;
GELU (exact, erf), Falcon's: elementwise."""

import torch
import torch.nn.functional as F

from llmengine_runtime.kernels.cpu import use_cpu_kernel


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Our C++ kernel for fp32 CPU rows, torch elsewhere."""
    if use_cpu_kernel(x) and x.stride(-1) == 1:
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.llmengine_cpu.silu_and_mul(rows).view(*x.shape[:-1], x.shape[-1] // 2)
    return silu_and_mul_ref(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Our C++ kernel for fp32 CPU rows (falcon_layers.cpp: the fused step's own), torch elsewhere."""
    if use_cpu_kernel(x) and x.stride(-1) == 1 and x.numel():
        return torch.ops.llmengine_cpu.gelu(x.reshape(-1, x.shape[-1])).view(x.shape)
    return F.gelu(x)
