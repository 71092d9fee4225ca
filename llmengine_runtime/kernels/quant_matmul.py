"""Weight-only quantized products `y[T, N] = x[T, K] @ W[N, K]^T`, dequantizing W in registers (w4a16, w8a16).

Layouts (the CUDA ones; the CPU path in models/quantized_linear.py uses torch's own packed kernels):
- int4 (`w4a16`): `w_int4` uint8 `[N, K/2]`. Each run of 32 k's of a row takes 16 bytes: byte j holds
  q[k0 + j] in its low nibble and q[k0 + 16 + j] in its high nibble (the nibble order of GGUF's Q4 blocks,
  so a Q4_0/Q4_1 tensor's quants are already in this layout). q in 0..15 and `w = q * scale + min` with
  `scale`, `min` `[K/group, N]` (fp16 or fp32), group a power of two >= 32 dividing K.
- int8 (`w8a16`): `w_int8` int8 `[N, K]`, `w = q * scale` with `scale` `[num_groups, N]`: one group of the
  whole row (per output channel, group_size = K) or groups of a power of two >= 32 dividing K (GGUF Q8_0).

x is fp16, bf16 or fp32 (row stride free, last dim contiguous); y has x's dtype. Both kernels take one K-step
inside one scale group, multiply x by the integer q exactly (q is exact in every activation dtype) with fp32
accumulation, and apply the group's scale (and min times the step's sum of x) to the step's partial sums.
Two program shapes: a GEMV-shaped one for a few rows (decode) that multiplies and sums in fp32 on the CUDA
cores, and a tiled `tl.dot` one for many rows (prefill). Under `--deterministic` (kernels/deterministic.py) every
row count takes the tiled one with BLOCK_M 16, so a row's result does not depend on how many rows there are.
"""

import torch
import triton
import triton.language as tl

from llmengine_runtime.kernels.deterministic import deterministic
from llmengine_runtime.kernels.dispatch import use_triton

GEMV_MAX_ROWS = 4  # up to this many rows the GEMV-shaped programs; more take the tl.dot ones
INT4_CHUNK = 32  # k's per run of 16 bytes in the int4 layout


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q `[N, K]` in 0..15 (K a multiple of 32) -> uint8 `[N, K/2]` in the layout above."""
    n, k = q.shape
    runs = q.to(torch.uint8).view(n, k // INT4_CHUNK, 2, INT4_CHUNK // 2)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(w_int4: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 `[N, K]` in 0..15."""
    n, half = w_int4.shape
    runs = w_int4.view(n, half // (INT4_CHUNK // 2), 1, INT4_CHUNK // 2)
    return torch.cat([runs & 15, runs >> 4], dim=2).reshape(n, 2 * half)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def w4a16_matmul_ref(x: torch.Tensor, w_int4: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Plain torch: dequantize W in full (float64 for float64 x, else fp32), one product, cast to x's dtype."""
    dtype = _compute_dtype(x)
    q = unpack_int4(w_int4).to(dtype)
    w = q * scale.t().to(dtype).repeat_interleave(group_size, 1) + min_.t().to(dtype).repeat_interleave(group_size, 1)
    return (x.to(dtype) @ w.t()).to(x.dtype)


def w8a16_matmul_ref(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    dtype = _compute_dtype(x)
    w = w_int8.to(dtype) * scale.t().to(dtype).repeat_interleave(group_size, 1)[:, :w_int8.shape[1]]
    return (x.to(dtype) @ w.t()).to(x.dtype)


@triton.jit
def w4a16_gemv_kernel(x_ptr, w_int4_ptr, scale_ptr, min_ptr, y_ptr, T, N, K, group_size,
                      stride_x, stride_w, stride_s, stride_y,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int4 weights, few rows: fp32 multiply-and-sum, no tensor cores.

    Layout: x `[T, K]`; w_int4 uint8 `[N, K/2]` (int4 layout of the module docstring); scale, min
    `[K/group, N]` (row stride stride_s); y `[T, N]`. Grid: `(cdiv(N, BLOCK_N), cdiv(T, BLOCK_T))`.
    Program (j, i) computes y for rows `i*BLOCK_T ..` and columns `j*BLOCK_N ..`, looping over K in steps
    of BLOCK_K (a multiple of 32 dividing the group): per step it loads `[BLOCK_K/2, BLOCK_N]` bytes, splits
    them into the low-nibble and high-nibble k's, and adds `scale * sum_k x q + min * sum_k x`.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)
    k_lo = (offs_b // 16) * 32 + offs_b % 16  # the k of each byte's low nibble; its high nibble is k + 16
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x
    w_cols = w_int4_ptr + offs_n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // group_size
        s = tl.load(scale_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        m = tl.load(min_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        packed = tl.load(w_cols + (k0 // 2 + offs_b)[:, None], mask=n_mask[None, :], other=0)
        q_lo = (packed & 15).to(tl.float32)
        q_hi = (packed >> 4).to(tl.float32)
        x_lo = tl.load(x_rows + (k0 + k_lo)[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + (k0 + 16 + k_lo)[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
        xq = tl.sum(x_lo[:, :, None] * q_lo[None, :, :], 1) + tl.sum(x_hi[:, :, None] * q_hi[None, :, :], 1)
        x_sum = tl.sum(x_lo, 1) + tl.sum(x_hi, 1)
        acc += xq * s[None, :] + x_sum[:, None] * m[None, :]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def w4a16_dot_kernel(x_ptr, w_int4_ptr, scale_ptr, min_ptr, y_ptr, T, N, K, group_size,
                     stride_x, stride_w, stride_s, stride_y,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """int4 weights, many rows: tensor-core tiles.

    Layout: as w4a16_gemv_kernel. Grid: `(cdiv(T, BLOCK_M), cdiv(N, BLOCK_N))`. Program (i, j) computes the
    `[BLOCK_M >= 16, BLOCK_N]` tile of y at rows `i*BLOCK_M ..`, columns `j*BLOCK_N ..`. Per K-step (BLOCK_K,
    a multiple of 32 dividing the group) two `tl.dot`s, `x[:, low-nibble k's] @ q_lo` and the same for the
    high nibbles, with q cast exactly to x's dtype and fp32 accumulation; then `acc += scale * dots +
    min * sum_k x`.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)
    k_lo = (offs_b // 16) * 32 + offs_b % 16
    m_mask = offs_m < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    w_cols = w_int4_ptr + offs_n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // group_size
        s = tl.load(scale_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        m = tl.load(min_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        packed = tl.load(w_cols + (k0 // 2 + offs_b)[:, None], mask=n_mask[None, :], other=0)
        # via fp32: exact either way, and the triton interpreter's integer -> bf16 cast is broken
        q_lo = (packed & 15).to(tl.float32).to(x_ptr.dtype.element_ty)
        q_hi = (packed >> 4).to(tl.float32).to(x_ptr.dtype.element_ty)
        x_lo = tl.load(x_rows + (k0 + k_lo)[None, :], mask=m_mask[:, None], other=0.0)
        x_hi = tl.load(x_rows + (k0 + 16 + k_lo)[None, :], mask=m_mask[:, None], other=0.0)
        xq = tl.dot(x_lo, q_lo, input_precision=DOT_PRECISION)
        xq = tl.dot(x_hi, q_hi, acc=xq, input_precision=DOT_PRECISION)
        x_sum = tl.sum(x_lo.to(tl.float32), 1) + tl.sum(x_hi.to(tl.float32), 1)
        acc += xq * s[None, :] + x_sum[:, None] * m[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def w8a16_gemv_kernel(x_ptr, w_int8_ptr, scale_ptr, y_ptr, T, N, K, group_size,
                      stride_x, stride_w, stride_s, stride_y,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 weights, few rows: fp32 multiply-and-sum, no tensor cores.

    Layout: x `[T, K]`; w_int8 `[N, K]` (row stride stride_w); scale `[num_groups, N]`; y `[T, N]`.
    Grid: `(cdiv(N, BLOCK_N), cdiv(T, BLOCK_T))`. Program (j, i) computes y for rows `i*BLOCK_T ..` and
    columns `j*BLOCK_N ..`, looping over K in BLOCK_K steps (each inside one group; the last one masked
    when K is not a multiple) and adding `scale * sum_k x q`.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x
    w_cols = w_int8_ptr + offs_n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        s = tl.load(scale_ptr + (k0 // group_size) * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        q = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.float32)
        x = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * q[None, :, :], 1) * s[None, :]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def w8a16_dot_kernel(x_ptr, w_int8_ptr, scale_ptr, y_ptr, T, N, K, group_size,
                     stride_x, stride_w, stride_s, stride_y,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """int8 weights, many rows: tensor-core tiles.

    Layout: as w8a16_gemv_kernel. Grid: `(cdiv(T, BLOCK_M), cdiv(N, BLOCK_N))`. Program (i, j) computes the
    `[BLOCK_M >= 16, BLOCK_N]` tile of y at rows `i*BLOCK_M ..`, columns `j*BLOCK_N ..`: per K-step (inside
    one group, the last one masked) `acc += scale * tl.dot(x, q)` with q cast exactly to x's dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    w_cols = w_int8_ptr + offs_n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        s = tl.load(scale_ptr + (k0 // group_size) * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        q = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = q.to(tl.float32).to(x_ptr.dtype.element_ty)  # via fp32: the interpreter's int -> bf16 is broken
        acc += tl.dot(x, q, input_precision=DOT_PRECISION) * s[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def step_k(group_size: int, K: int) -> int:
    """K per loop step: inside one scale group (any size when the whole row is one group), <= 64."""
    if group_size >= K:
        return 64
    assert group_size >= 32 and group_size & (group_size - 1) == 0 and K % group_size == 0, \
        f"group_size {group_size} must be a power of two >= 32 dividing K={K}"
    return min(group_size, 64)


def quant_launch_config(gemv: bool, num_rows: int, group_size: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the GEMV-shaped (`gemv`) or tiled programs for `num_rows` rows."""
    block_k = step_k(group_size, K)
    if gemv:
        return dict(BLOCK_T=min(triton.next_power_of_2(max(num_rows, 1)), GEMV_MAX_ROWS), BLOCK_N=64,
                    BLOCK_K=block_k, num_warps=4, num_stages=2)
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    return dict(DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=64,
                BLOCK_K=block_k, num_warps=4, num_stages=3)


def _launch(gemv_kernel, dot_kernel, x, weights, scale, n, group_size, k, gemv):
    rows = x.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y
    fixed = deterministic() and gemv is None  # --deterministic: the tiled program with BLOCK_M 16 for any M
    gemv = False if fixed else rows <= GEMV_MAX_ROWS if gemv is None else gemv
    config = quant_launch_config(gemv, 1 if fixed else rows, group_size, k, x.dtype)
    block_rows = config["BLOCK_T"] if gemv else config["BLOCK_M"]
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(rows, block_rows))
    if not gemv:
        grid, kernel = grid[::-1], dot_kernel
    else:
        kernel = gemv_kernel
    kernel[grid](x, *weights, y, rows, n, k, group_size,
                 x.stride(0), weights[0].stride(0), scale.stride(0), y.stride(0), **config)
    return y


def w4a16_matmul_triton(x: torch.Tensor, w_int4: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor,
                        group_size: int, gemv: bool | None = None) -> torch.Tensor:
    """Triton path of `w4a16_matmul`; `gemv` forces one program shape (default: GEMV up to 4 rows)."""
    assert scale.stride() == min_.stride() and scale.stride(-1) == 1 and w_int4.stride(-1) == 1
    return _launch(w4a16_gemv_kernel, w4a16_dot_kernel, x, (w_int4, scale, min_), scale, w_int4.shape[0],
                   group_size, x.shape[1], gemv)


def w8a16_matmul_triton(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, group_size: int,
                        gemv: bool | None = None) -> torch.Tensor:
    """Triton path of `w8a16_matmul`; `gemv` forces one program shape (default: GEMV up to 4 rows)."""
    assert scale.stride(-1) == 1 and w_int8.stride(-1) == 1
    return _launch(w8a16_gemv_kernel, w8a16_dot_kernel, x, (w_int8, scale), scale, w_int8.shape[0],
                   group_size, x.shape[1], gemv)


def w4a16_matmul(x: torch.Tensor, w_int4: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """`x @ (q * scale + min)^T` for int4 weights in the layout of the module docstring."""
    if use_triton(x):
        return w4a16_matmul_triton(x, w_int4, scale, min_, group_size)
    return w4a16_matmul_ref(x, w_int4, scale, min_, group_size)


def w8a16_matmul(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """`x @ (q * scale)^T` for int8 weights `[N, K]`, scales per group of `group_size` k's."""
    if use_triton(x):
        return w8a16_matmul_triton(x, w_int8, scale, group_size)
    return w8a16_matmul_ref(x, w_int8, scale, group_size)
