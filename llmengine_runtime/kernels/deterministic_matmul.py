"""`y = x @ w^T (+ bias)` with fixed tiles and no split-K: a row's result does not depend on how many rows there are.

Layout: x `[M, K]` (last dim contiguous), w `[N, K]` (an nn.Linear weight, last dim contiguous), bias `[N]` or
None; y `[M, N]` in x's dtype. fp32 accumulation. The tile sizes are constants of the dtype, never chosen from M,
and K is reduced by one program from 0 upward in BLOCK_K steps, so every output element sees the same sequence of
tile products whatever M is and wherever its row sits (cuBLAS picks kernels, tiles and split-K by shape, so its
rows change with the batch). Used for the float linear layers under `--deterministic` on CUDA
(kernels/deterministic.py); elsewhere `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmengine_runtime.kernels.deterministic import deterministic
from llmengine_runtime.kernels.dispatch import use_triton


@triton.jit
def fixed_tile_matmul_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                             HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile of `x @ w^T (+ bias)`.

    Layout: as the module docstring; strides are the row strides. Grid: `(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))`.
    Program (i, j) computes y rows `i*BLOCK_M ..`, columns `j*BLOCK_N ..`: an fp32 accumulator over K in BLOCK_K
    steps from 0 upward (the last step masked, its missing products exact zeros), then the bias, stored in y's
    dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + offs_k)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fixed_tiles(dtype: torch.dtype) -> dict:
    """The tiles of one dtype: fixed, whatever M (BLOCK_M 32 keeps decode's few rows from wasting most of a
    tile; fp32 takes a shorter K step for shared memory)."""
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=3)


def fixed_tile_matmul_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of `deterministic_linear` for x `[..., K]`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    rows, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows and n:
        config = fixed_tiles(x.dtype)
        grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
        fixed_tile_matmul_kernel[grid](
            x2, weight, bias if bias is not None else weight, y, rows, n, k,
            x2.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
            DOT_PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32", **config)
    return y.view(*shape[:-1], n)


def deterministic_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 reference of the product (tests)."""
    y = x.double() @ weight.double().T
    return (y if bias is None else y + bias.double()).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, or under `--deterministic` on the Triton path the fixed-tile product (a row's result the same
    for any number of rows)."""
    if deterministic() and use_triton(x):
        return fixed_tile_matmul_triton(x, weight, bias)
    return F.linear(x, weight, bias)
