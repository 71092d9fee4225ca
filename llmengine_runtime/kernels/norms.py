"""RMSNorm (optionally fused with the residual add) and LayerNorm with bias, over the last dim.

Layout: x `[num_tokens, hidden]`, weight (and bias) `[hidden]`. Statistics in fp32, output in x's dtype.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmengine_runtime.kernels.cpu import use_cpu_kernel
from llmengine_runtime.kernels.dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    # as HF: normalise in fp32, round to x's dtype, then scale by the weight in that dtype
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


@triton.jit
def rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, h_ptr,
    stride_x, stride_r, stride_out, stride_h,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """RMSNorm of one row, optionally after adding the residual.

    Layout: x, residual, out, h `[num_rows, hidden]` (row strides given, last dim contiguous); weight
    `[hidden]`. Grid: `(num_rows,)`. One program normalises row `program_id(0)` in one `BLOCK >= hidden`
    tile: with HAS_RESIDUAL it first writes `h = x + residual` (rounded to x's dtype, as the torch path
    does) and normalises h. Statistics in fp32; the normalised row is rounded to x's dtype before the
    weight multiply, like HF's LlamaRMSNorm.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    stride_x, stride_out,
    hidden, eps,
    BLOCK: tl.constexpr,
):
    """LayerNorm with bias of one row.

    Layout: x, out `[num_rows, hidden]` (row strides given, last dim contiguous); weight, bias
    `[hidden]`. Grid: `(num_rows,)`. One program normalises row `program_id(0)` in one `BLOCK >= hidden`
    tile: mean and biased variance in fp32, `(x - mean) * rstd * weight + bias` in fp32, then x's dtype.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / hidden
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (centered * rstd * w + b).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D `[num_rows, hidden]` tensor whose last dim is contiguous (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm_launch_config(hidden: int, element_size: int) -> dict:
    """One power-of-two tile per row; about 8 elements per thread, 1 to 16 warps."""
    block = triton.next_power_of_2(hidden)
    if block * element_size > 65536:
        raise ValueError(f"hidden size {hidden} is too large for the one-tile norm kernels")
    return dict(BLOCK=block, num_warps=min(max(block // 256, 1), 16))


def rms_norm_triton(x, weight, eps, residual=None):
    x2 = _rows(x)
    num_rows, hidden = x2.shape
    out = torch.empty_like(x2)
    config = norm_launch_config(hidden, x2.element_size())
    if residual is None:
        r2, h = x2, out  # unused pointers
    else:
        r2 = _rows(residual)
        h = torch.empty_like(x2)
    if num_rows == 0:
        return out.view(x.shape) if residual is None else (out.view(x.shape), h.view(x.shape))
    rms_norm_kernel[(num_rows,)](
        x2, r2, weight, out, h,
        x2.stride(0), r2.stride(0), out.stride(0), h.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, **config,
    )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), h.view(x.shape)


def layer_norm_triton(x, weight, bias, eps):
    x2 = _rows(x)
    num_rows, hidden = x2.shape
    out = torch.empty_like(x2)
    config = norm_launch_config(hidden, x2.element_size())
    if num_rows == 0:
        return out.view(x.shape)
    layer_norm_kernel[(num_rows,)](
        x2, weight, bias, out, x2.stride(0), out.stride(0), hidden, eps,
        **config,
    )
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`weight * x / rms(x)`. With `residual`, first `h = x + residual` and return `(rms_norm(h), h)`."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    if use_cpu_kernel(x, weight, *([] if residual is None else [residual])) and x.stride(-1) == 1:
        rows = x.reshape(-1, x.shape[-1])
        out, h = torch.ops.llmengine_cpu.rms_norm(rows, weight, eps, None if residual is None
                                                  else residual.reshape(rows.shape))
        return out.view(x.shape) if residual is None else (out.view(x.shape), h.view(x.shape))
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`(x - mean) / std * weight + bias` over the last dim."""
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps)
    if use_cpu_kernel(x, weight, bias) and x.stride(-1) == 1:  # (the fused step's own rows: falcon_layers.cpp)
        return torch.ops.llmengine_cpu.layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, eps).view(x.shape)
    return layer_norm_ref(x, weight, bias, eps)
