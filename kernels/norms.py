"""RMSNorm (optionally fused with the residual add) and LayerNorm with bias, over the last dim.

Layout: x `[num_tokens, hidden]`, weight (and bias) `[hidden]`. Statistics in fp32, output in x's dtype.
"""

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def rms_norm_triton(x, weight, eps, residual=None):
    raise NotImplementedError("Triton rms_norm: see the kernels issue")


def layer_norm_triton(x, weight, bias, eps):
    raise NotImplementedError("Triton layer_norm: see the kernels issue")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`weight * x / rms(x)`. With `residual`, first `h = x + residual` and return `(rms_norm(h), h)`."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`(x - mean) / std * weight + bias` over the last dim."""
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)
