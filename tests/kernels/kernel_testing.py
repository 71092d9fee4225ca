"""Shared pieces of the kernel tests: error bounds, and the paged cache of kernels/testing.py."""

import os

import torch

from llmengine_runtime.models import layers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Attention outputs (|out| <~ 3) against a float64 reference: fp32 runs tf32x3 on GPUs (~1e-6);
# 16-bit inputs also round the softmax weights before the PV product.
ATTN_TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# The triton 3.9 interpreter truncates fp32 -> bf16 casts (compiled kernels round to nearest even), so a
# value the kernel rounds to bf16 may sit one bf16 ulp (2^-7 relative) off torch's rounding there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def rounding_tol(dtype: torch.dtype) -> float:
    """Relative bound for a value computed in fp32 and rounded once to dtype: 0 (the same rounding as
    torch) unless the interpreter's bf16 truncation is at play."""
    return 2.0 ** -7 if INTERPRETED and dtype == torch.bfloat16 else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert not actual.isnan().any(), f"{int(actual.isnan().sum())} NaN elements (unwritten output?)"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


def alibi_slopes(num_heads: int, device) -> torch.Tensor:
    return layers.alibi_slopes(num_heads).to(device)


def randn(*shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
