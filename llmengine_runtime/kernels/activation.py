"""SiLU-and-multiply, Llama's MLP activation: x `[..., 2I]` holding (gate | up) -> `silu(gate) * up` `[..., I]`."""

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
