"""The float32 helpers of the GGUF quantizers (gguf_quantize.py says why every operation is the C's) and the
32-weight types.

Each block of 32 (`x[0..31]`):
- Q8_0 (34 bytes: fp16 d, int8 q[32]): `d = max|x| / 127`, `q = roundf(x / d)`.
- Q4_0 (18: d, nibbles): `d = m / -8` with m the x of largest |x| (the first), `q = min(15, trunc(x / d + 8.5))`,
  `w = (q - 8) d`.  Q5_0 (22: d, qh[4], nibbles): the same with 16 and 31; bit 4 of q_j is bit j of qh.
- Q4_1 (20: d, m, nibbles): `d = (max - min) / 15`, `q = min(15, trunc((x - min) / d + 0.5))`, `w = q d + m`.
  Q5_1 (24: d, m, qh, nibbles): 31 levels, no clamp.
Nibble byte j holds q_j (low) and q_{16+j} (high). "/ d" is "* (1 / d)" throughout, as in the C.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

QK = 32
MAGIC_ROUND = 12582912.0  # 1.5 * 2^23: adding it leaves round-half-even(x) in the low mantissa bits


def qtype_of(qtype: GGMLQuantizationType | str) -> GGMLQuantizationType:
    """A GGML type from its enum or name ("q4_k", "Q8_0")."""
    return qtype if isinstance(qtype, GGMLQuantizationType) else GGMLQuantizationType[qtype.upper()]


def f32(value: float) -> float:
    """`value` rounded to float32, as the C's float constants and float arithmetic on them are."""
    return float(np.float32(value))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the float32 magic number (|v| < 2^22); int32."""
    bits = (v.to(torch.float32) + MAGIC_ROUND).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round takes them to even)."""
    t = v.trunc()
    return t + torch.where((v - t).abs() >= 0.5, v.sign(), torch.zeros_like(v))


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back to float32 (round to nearest even)."""
    return v.to(torch.float16).to(torch.float32)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """`[B]` float32 -> `[B, 2]` uint8, the little-endian fp16 that GGML_FP32_TO_FP16 stores."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def rdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """`numerator / t`, correctly rounded: torch computes `scalar / tensor` as `scalar * (1 / tensor)`, which is
    one float32 ulp off now and then (`tensor / scalar` is a true division)."""
    return torch.tensor(numerator, dtype=t.dtype) / t


def reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f / d : 0.0f`."""
    return torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))


def sequential_sum(terms: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`s = 0; for i: s += terms[i]` in float32, for `[n, B]` terms (or their rows, `terms.unbind(0)`, made once
    for a buffer summed again and again): the C loops' order and rounding."""
    rows = terms.unbind(0) if isinstance(terms, torch.Tensor) else terms
    acc = torch.zeros_like(rows[0])
    for row in rows:
        acc.add_(row)
    return acc


def first_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block of `[n, B]`, the x of largest |x|, the first one on ties (the C loops' strict `<`)."""
    index = x.abs().argmax(dim=0, keepdim=True)  # argmax returns the first maximal index
    return x.gather(0, index)[0]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """`[32, B]` codes 0..15 -> `[B, 16]` bytes: byte j = q_j | q_{16+j} << 4."""
    return (q[:16] | (q[16:] << 4)).t().to(torch.uint8)


def pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """`[32, B]` 5-bit codes -> `[B, 4]` bytes of the uint32 whose bit j is bit 4 of q_j (little-endian)."""
    bits = ((q >> 4) & 1).t().reshape(-1, 4, 8)
    return (bits << torch.arange(8, dtype=bits.dtype)).sum(-1).to(torch.uint8)


def _symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: (stored d, codes) with `d = max / -(levels/2)`, `q = min(levels-1, trunc(x/d + levels/2 + .5))`."""
    half = levels // 2
    d = first_absmax(x) / -float(half)
    q = (x * reciprocal_or_zero(d) + (half + 0.5)).trunc().clamp(max=levels - 1).to(torch.int32)
    return d, q


def _min_max(x: torch.Tensor, levels: int, clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: (d, min, codes) with `d = (max - min) / (levels - 1)`, `q = trunc((x - min)/d + .5)`."""
    lo, hi = x.amin(0), x.amax(0)
    d = (hi - lo) / float(levels - 1)
    q = ((x - lo) * reciprocal_or_zero(d) + 0.5).trunc()
    if clamp:
        q = q.clamp(max=levels - 1)
    return d, lo, q.to(torch.int32)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(0) / 127.0
    q = roundf(x * reciprocal_or_zero(d)).to(torch.int8)
    return torch.cat([fp16_bytes(d), q.t().contiguous().view(torch.uint8)], dim=1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16)
    return torch.cat([fp16_bytes(d), pack_nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 32)
    return torch.cat([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q & 15)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _min_max(x, 16, clamp=True)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), pack_nibbles(q)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _min_max(x, 32, clamp=False)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), pack_high_bits(q), pack_nibbles(q & 15)], dim=1)
