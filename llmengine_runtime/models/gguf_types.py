"""The GGUF weight types we serve, one table entry each (as llama.cpp's `type_traits`): block layout, a torch
dequantizer of raw block bytes, and whether our C++ product takes the type.

A GGUF row of K weights is K / block consecutive blocks of `block_bytes` bytes each (fp16 and bf16 are one-element
"blocks"); all multi-byte fields are little-endian. Per block (d, dmin: fp16; q: the integer of one weight):
- Q4_0 (32 w, 18 B): d, 16 B of nibbles; `w = d (q - 8)`. Byte j holds q[j] (low nibble) and q[16 + j] (high).
- Q4_1 (32 w, 20 B): d, m, nibbles as Q4_0; `w = d q + m`.
- Q5_0 (32 w, 22 B): d, 4 B of fifth bits (bit i of the little-endian uint32 for q[i]), nibbles as Q4_0;
  `w = d (q - 16)`.   Q5_1 (32 w, 24 B): d, m, fifth bits, nibbles; `w = d q + m`.
- Q8_0 (32 w, 34 B): d, 32 int8; `w = d q`.
- Q2_K (256 w, 84 B): 16 B of sub-block scales (low nibble: scale, high: min), 64 B of 2-bit q's, d, dmin.
  `w = (d sc) q - dmin mn` per sub-block of 16. 2-bit fields: in each 32-byte half h, the field at shift 2s of
  byte j is q[128 h + 32 s + j].
- Q3_K (256 w, 110 B): 32 B high-bit mask, 64 B low 2 bits (as Q2_K), 12 B of sixteen 6-bit scales, d.
  `q = low - 4 (1 - high)`, `w = (d (sc - 32)) q` per sub-block of 16; bit b of mask byte j is for q[32 b + j].
  Scale i: low nibble from byte i % 8 (shift 4 (i // 8)), high 2 bits from byte 8 + i % 4 (shift 2 (i // 4)).
- Q4_K (256 w, 144 B): d, dmin, 12 B of eight 6-bit scales and mins, 128 B nibbles (each 32-byte chunk c: low
  nibbles are sub-block 2c, high 2c + 1). `w = (d sc) q - dmin mn` per sub-block of 32. With the 12 bytes as
  a[0:4], b[4:8], c[8:12]: sc = a & 63, then (c & 15) | ((a >> 2) & 48); mn = b & 63, then (c >> 4) | ((b >> 2) & 48).
- Q5_K (256 w, 176 B): Q4_K's fields plus 32 B of fifth bits (bit b of byte j for sub-block b's q[j]) before the
  nibbles.
- Q6_K (256 w, 210 B): 128 B low nibbles, 64 B high 2 bits, 16 int8 scales, d. `w = (d sc) (q - 32)` per
  sub-block of 16. Low nibbles: in each 64-byte half h, nibble n of byte j is q[128 h + 64 n + j]; high bits as
  Q2_K's 2-bit fields of 32-byte halves.
The dequantizers do the same fp32 operations in the same order as gguf-py's numpy ones (`gguf.quants`), so they
are bit-exact against it; they take uint8 tensors on any device and work on whole rows (or a few looked-up rows).

`activation`: the block our C++ product quantizes x into for the integer dot product (Q8_0 for 32-blocks, Q8_K
for 256-blocks; None for float weights); `has_cpu_product(t)` says whether the built library takes the type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, 2]` -> fp32 `[B, 1]` (the fp16 they hold)."""
    return b.contiguous().view(torch.float16).float()


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _fields(b: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 `[..., n]` -> `[..., 8 / width, n]`: each byte's `width`-bit fields, lowest first."""
    shifts = _SHIFTS.get((width, b.device))
    if shifts is None:  # (one broadcast shift instead of one op per field: a lookup of a few rows is op-bound)
        shifts = _SHIFTS[width, b.device] = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device)[:, None]
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _fields(b[:, 2:], 4).reshape(-1, 32)
    return _f16(b[:, :2]) * (q.int() - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _fields(b[:, 4:], 4).reshape(-1, 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _five_bit(high: torch.Tensor, nibbles: torch.Tensor) -> torch.Tensor:
    """Q5's q `[B, 32]`: bit i of the 4 bytes `high` over the nibbles."""
    bits = _fields(high, 1).transpose(1, 2).reshape(-1, 32)  # [B, byte, bit] -> q index 8 byte + bit
    return (_fields(nibbles, 4).reshape(-1, 32) | (bits << 4)).int()


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_five_bit(b[:, 2:6], b[:, 6:]) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _five_bit(b[:, 4:8], b[:, 8:]).float() + _f16(b[:, 2:4])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _two_bit(qs: torch.Tensor) -> torch.Tensor:
    """K-types' 2-bit fields, 64 bytes -> `[B, 16, 16]` (sub-blocks of 16) in weight order."""
    return _fields(qs.reshape(-1, 2, 32), 2).reshape(-1, 16, 16)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    scales, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl, ml = d * (scales & 15).float(), dmin * (scales >> 4).float()
    return (dl[..., None] * _two_bit(b[:, 16:80]).float() - ml[..., None]).reshape(-1, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask, packed, d = b[:, :32], b[:, 96:108], _f16(b[:, 108:110])
    low = _fields(packed[:, :8], 4).reshape(-1, 16)
    high = _fields(packed[:, 8:], 2).reshape(-1, 16)
    dl = d * (((low & 15) | (high << 4)).int() - 32).float()
    upper = _fields(hmask.reshape(-1, 1, 32), 1).reshape(-1, 16, 16)
    q = _two_bit(b[:, 32:96]).int() - 4 * (1 - upper.int())
    return (dl[..., None] * q.float()).reshape(-1, 256)


def _scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins from their 12 bytes, each fp32 `[B, 8]`."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    return sc.float(), mn.float()


def _k_sub_blocks(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: `(d sc) q - dmin mn` for q `[B, 8, 32]` (d, dmin, scales: the block's first 16 bytes)."""
    sc, mn = _scales_mins(b[:, 4:16])
    dl, ml = _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn
    return (dl[..., None] * q.float() - ml[..., None]).reshape(-1, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_sub_blocks(b, _fields(b[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    low = _fields(b[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    high = _fields(b[:, 16:48].reshape(-1, 1, 32), 1).reshape(-1, 8, 32)
    return _k_sub_blocks(b, low | (high << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    low = _fields(b[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 8, 32)
    high = _fields(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).int() - 32).reshape(-1, 16, 16)
    dl = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (dl[..., None] * q.float()).reshape(-1, 256)


def _view_as(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: b.contiguous().view(dtype).float()


@dataclass(frozen=True)
class GGUFType:
    """One weight type: `block` weights in `block_bytes` bytes; `dequantize_blocks` maps uint8 `[B, block_bytes]`
    to fp32 `[B, block]`; `activation` is the block type x is quantized to for the C++ integer product."""
    qtype: GGMLQuantizationType
    block: int
    block_bytes: int
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]
    activation: str | None

    @property
    def name(self) -> str:
        return self.qtype.name

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise ValueError(f"{self.name} rows are whole blocks of {self.block}; K = {k} is not")
        return k // self.block * self.block_bytes

    def dequantize(self, raw: torch.Tensor, k: int) -> torch.Tensor:
        """uint8 rows `[N, row_bytes(k)]` (any device) -> fp32 `[N, k]`."""
        n = raw.shape[0]
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (n, self.row_bytes(k)):
            raise ValueError(f"{self.name} rows of {k}: expected uint8 [N, {self.row_bytes(k)}], "
                             f"got {raw.dtype} {tuple(raw.shape)}")
        if n == 0:
            return torch.empty(0, k, device=raw.device)
        return self.dequantize_blocks(raw.reshape(-1, self.block_bytes)).reshape(n, k)


TYPES: dict[GGMLQuantizationType, GGUFType] = {t.qtype: t for t in [
    GGUFType(Q.F32, 1, 4, _view_as(torch.float32), None),
    GGUFType(Q.F16, 1, 2, _view_as(torch.float16), None),
    GGUFType(Q.BF16, 1, 2, _view_as(torch.bfloat16), None),
    GGUFType(Q.Q4_0, 32, 18, _q4_0, "Q8_0"),
    GGUFType(Q.Q4_1, 32, 20, _q4_1, "Q8_0"),
    GGUFType(Q.Q5_0, 32, 22, _q5_0, "Q8_0"),
    GGUFType(Q.Q5_1, 32, 24, _q5_1, "Q8_0"),
    GGUFType(Q.Q8_0, 32, 34, _q8_0, "Q8_0"),
    GGUFType(Q.Q2_K, 256, 84, _q2_k, "Q8_K"),
    GGUFType(Q.Q3_K, 256, 110, _q3_k, "Q8_K"),
    GGUFType(Q.Q4_K, 256, 144, _q4_k, "Q8_K"),
    GGUFType(Q.Q5_K, 256, 176, _q5_k, "Q8_K"),
    GGUFType(Q.Q6_K, 256, 210, _q6_k, "Q8_K"),
]}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


class UnsupportedGGUFType(ValueError):
    """A tensor of a type outside TYPES (IQ*, TQ*, MXFP4, ...)."""


def gguf_type(qtype: int | GGMLQuantizationType, tensor_name: str | None = None) -> GGUFType:
    """The table entry of a type; UnsupportedGGUFType naming the tensor, the type and what is accepted."""
    try:
        qtype = GGMLQuantizationType(int(qtype))
    except ValueError:
        pass  # an unknown number: said as such below
    entry = TYPES.get(qtype)
    if entry is None:
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else f"number {qtype}"
        where = f"GGUF tensor {tensor_name!r} has" if tensor_name else "GGUF"
        raise UnsupportedGGUFType(f"{where} type {name}, which is not supported "
                                  f"(supported: {', '.join(t.name for t in TYPES)})")
    return entry


def raw_rows(tensor) -> torch.Tensor:
    """A GGUFReader tensor's bytes as uint8 `[N, row_bytes]` (a copy: the reader's arrays map the file
    read-only), after checking its type is in the table. GGUF lists dims innermost first: `shape = [K, N]`;
    tensors of more than 2 dims are flattened to rows of K."""
    entry = gguf_type(tensor.tensor_type, tensor.name)
    k = int(tensor.shape[0])
    data = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1, entry.row_bytes(k))
    return torch.from_numpy(data.copy())


def tensor_shape(tensor) -> tuple[int, ...]:
    """A GGUFReader tensor's shape in torch order (outermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape))


def has_cpu_product(qtype: GGMLQuantizationType) -> bool:
    """Whether `torch.ops.llmengine_cpu.gguf_linear` (kernels/cpu/gguf_linear.cpp) is built, loaded, not disabled
    by LLMENGINE_CPU_KERNELS=0, and takes this type (as its `gguf_linear_supported` says)."""
    from llmengine_runtime.kernels import cpu as cpu_kernels

    return qtype in TYPES and cpu_kernels.available() and _op_takes(qtype)


@cache
def _op_takes(qtype: GGMLQuantizationType) -> bool:
    ops = torch.ops.llmengine_cpu
    return hasattr(ops, "gguf_linear") and hasattr(ops, "gguf_linear_supported") \
        and bool(ops.gguf_linear_supported(int(qtype)))
