"""Plain-torch references of what the C++ quantized products do to their activations (tests hold them against it)."""

import torch
import torch.nn.functional as F

BLOCK = 32


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 `[M, K]` as the kernels quantize it: per block of 32 k's (K zero-padded), xd = max|x| / 127 in fp32 and
    xq = round-half-even(x * fp32(1 / xd)) in -127..127. Returns xq `[M, blocks, 32]` and xd `[M, blocks]`, fp32."""
    k = x.shape[-1]
    xb = F.pad(x.float(), (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))
    xd = xb.abs().amax(-1) / 127
    inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
    return torch.round(xb * inv[..., None]), xd


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """`xd * xq`, the activations the integer product effectively multiplies by, fp32 `[..., K]`."""
    xq, xd = int8_blocks(x)
    return (xq * xd[..., None]).flatten(-2)[..., :x.shape[-1]]
