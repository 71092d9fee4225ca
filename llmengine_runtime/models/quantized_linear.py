"""Weight-only quantized projections (int8 per output channel, int4 per group of K) and `quantize_model`.

The weight `W [N, K]` is stored as integers and scales; activations stay floating point.
- int8: `w = q * scale`, q in -127..127, one scale per output row (or per group of K, as GGUF Q8_0 has).
  `quantize`: `scale = max|w_row| / 127`, rounded to the storage dtype, then `q = round(w / stored scale)`.
  Bound: `|w - dequant| <= stored scale / 2` (the stored scale is within 2^-8 of the exact one, so
  |w| / stored scale <= 127.5 and the clamp to +-127 never binds).
- int4: `w = (q - 8) * scale + zero`, q in 0..15, per group of `group_size` (32 or 64; 128, 256 work too)
  consecutive k's of a row. `quantize`: `scale = (max - min) / 15`, `zero = min + 8 * scale`, so q = 0..15
  spans [min, max]; `q = clamp(round((w - zero) / scale) + 8, 0, 15)` against the stored scale and zero.
  Bound: `|w - dequant| <= stored scale / 2 + u * (8 * scale + |zero|)`, u the unit roundoff of the storage
  dtype (2^-8 for bf16 on CPU; on CUDA fp16, 2^-11, and `u * (15 * scale + |min|)`): rounding the stored
  pair moves the ends of the covered range by that much.

Where it runs (chosen when the layer is built, from the weight's device; build it where it will run):
- CPU, `backend == "cpu"`: our C++ kernels (kernels/cpu/quant_gemm.cpp), the llama.cpp-style integer product;
  int4 and int8 with N a multiple of 8 keep their rows interleaved by eights (models/row_interleave.py) for
  kernels/cpu/q4_interleaved.cpp and q8_interleaved.cpp, GEMM micro-kernels (one output row per int32 lane).
  x is quantized per block of 32 to int8 (`x ~ xd * xq`, xd = max|x_block| / 127) and multiplied by the integer
  weights with AVX2 integer dot products, in fp32 from there on. int4 keeps torch's/Triton's byte layout
  (kernels/quant_matmul.py `pack_int4`) with fp16 `d = scale`, `m = zero - 8 scale` per block of 32
  (`w = q * d + m`); int8 keeps q (K padded to a multiple of 32) with an fp16 scale per block of 32. Scales are
  stored in fp16 (u = 2^-11). Error of the product: the weight's own, plus the activation rounding
  `|y - x W^T| <= sum_b (max|x_b| / 254) sum_{k in b} |w_k|` (fp32 accumulation aside).
- CPU without our kernels (no compiler, LLMENGINE_CPU_KERNELS=0, or scales outside fp16), `backend == "torch"`:
  torch's weight-only kernels, which are vectorised only for bf16 activations, so x is cast to bf16
  for the call and the result back to x's dtype. int8: `aten._weight_int8pack_mm(x, q [N, K], scale [N])`.
  Its AVX-512 kernel steps K by 16 with aligned 256-bit loads of x rows and 128-bit loads of q rows (AVX2: by 8),
  and reads past the row or faults when K is not a multiple of 16 or a row is misaligned (torch 2.13,
  int8mm_kernel.cpp). So q is stored with K padded by zero weights to a multiple of 32, and x is padded to
  match and kept 64-byte aligned (`_torch_int8_input`).
  int4: `aten._convert_weight_to_int4pack_for_cpu` packs q once (rows padded to a multiple of 16),
  `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group, N, 2])` per call; scales
  are bf16. int8 with per-group scales (GGUF Q8_0) is exact as two int4 planes: with `q + 128 = 16a + b`,
  `w = (a - 8) * 16 scale + (b - 8) * scale + 8 scale`, one int4 product over `[x, x]` and `[A | B]`.
- CUDA (or LLMENGINE_FORCE_TRITON=1): kernels/quant_matmul.py (`w = q * scale + min` for int4; scales
  fp16 when they fit, else fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.dispatch import use_triton
from llmengine_runtime.kernels.quant_matmul import pack_int4, unpack_int4, w4a16_matmul, w8a16_matmul
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.row_interleave import deinterleave8, deinterleave8_q8, interleave8, interleave8_q8

INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZES = (64, 32)  # int4 default: the largest that divides every K
CPU_ROW_MULTIPLE = 16  # torch's CPU int4 packing needs N % 16 == 0
BLOCK = 32  # k's per scale in our CPU kernels' layout


def _fits_fp16(*tensors: torch.Tensor) -> bool:
    """Every value is 0, a normal fp16 number, or exactly an fp16 number (a GGUF's own subnormal scales)."""
    return all(bool(((t == 0) | ((t.abs() >= 2.0 ** -14) & (t.abs() <= 65504.0)) | (t.half().float() == t)).all())
               for t in tensors)


def _backend(t: torch.Tensor, *scales: torch.Tensor) -> str:
    """"triton" for CUDA tensors, "cpu" (our C++ kernels) when built and the scales fit fp16, else "torch"."""
    if use_triton(t):
        return "triton"
    return "cpu" if cpu_kernels.available() and _fits_fp16(*scales) else "torch"


def _scale_dtype(backend: str, *tensors: torch.Tensor) -> torch.dtype:
    """bf16 for torch's CPU kernels (they take scales in the activation dtype); fp16 for ours; fp16 for Triton
    when every nonzero value is a normal fp16 number, else fp32."""
    if backend == "torch":
        return torch.bfloat16
    return torch.float16 if backend == "cpu" or _fits_fp16(*tensors) else torch.float32


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def _groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[N, K/group]` per-group values -> `[N, K]`."""
    return t.repeat_interleave(group_size, dim=1)


def _torch_int8_input(xb: torch.Tensor, k_padded: int) -> torch.Tensor:
    """bf16 x `[M, K]` as torch's int8 kernel needs it: zero-padded to the stored q's K, 64-byte aligned."""
    if xb.shape[1] != k_padded:
        return torch.nn.functional.pad(xb, (0, k_padded - xb.shape[1]))  # a fresh, aligned tensor
    return xb if xb.data_ptr() % 64 == 0 else xb.clone()


class QuantizedLinear(nn.Module):
    """`y = x @ W^T (+ bias)` for x `[..., K]` in any float dtype, W int8 or int4 (see the module docstring).

    Build it with `quantize` (from a float weight), `from_int4` or `from_int8` (pre-quantized, e.g. GGUF).
    """

    def __init__(self, mode: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None):
        """q `[N, K]` (int8: -128..127; int4: 0..15); scale (and int4's zero) fp32 `[N, K / group_size]`;
        group_size = K for int8 per output channel."""
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"mode must be 'int8' or 'int4', not {mode!r}")
        self.mode, self.group_size = mode, group_size
        self.out_features, self.in_features = n, k = q.shape
        if k % group_size or tuple(scale.shape) != (n, k // group_size):
            raise ValueError(f"scale {tuple(scale.shape)} does not fit q {tuple(q.shape)} in groups of {group_size}")
        if (mode == "int4" or group_size != k) and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"{mode} group_size must be one of {INT4_GROUP_SIZES} (or K for int8), not {group_size}")
        scale = scale.float()
        min_ = zero.float() - 8 * scale if mode == "int4" else None
        self.backend = _backend(q, scale, *([] if min_ is None else [min_]))
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.k_copies = 1  # how many times x is repeated along K for torch's CPU int4 product
        if self.backend == "cpu":
            blocks = lambda t: t.repeat_interleave(group_size // BLOCK, 1) if group_size < k else \
                t[:, :1].expand(n, -(-k // BLOCK))  # per block of 32
            interleave = n % 8 == 0  # rows interleaved by eights (models/row_interleave.py)
            if mode == "int4":  # group sizes are multiples of 32, so K is too
                qs, d, m = pack_int4(q), blocks(scale).half(), blocks(min_).half()
                self._store(**dict(zip(("w_int4", "d", "m"), interleave8(qs, d, m) if interleave else (qs, d, m))))
            else:
                qs, d = torch.nn.functional.pad(q.to(torch.int8), (0, -k % BLOCK)), blocks(scale).half()
                self._store(**dict(zip(("w_int8", "d"), interleave8_q8(qs, d) if interleave else (qs, d))))
        elif self.backend == "triton":
            if mode == "int4":
                dtype = _scale_dtype("triton", scale, min_)
                self._store(w_int4=pack_int4(q), scale=scale.t().to(dtype), min=min_.t().to(dtype))
            else:
                self._store(w_int8=q.to(torch.int8), scale=scale.t().to(_scale_dtype("triton", scale)))
        elif mode == "int8" and group_size == k:
            self._store(w_int8=torch.nn.functional.pad(q.to(torch.int8), (0, -k % BLOCK)),
                        scale=scale[:, 0].to(torch.bfloat16))
        elif mode == "int8":  # per-group int8 as two int4 planes along K
            u = q.to(torch.int32) + 128
            self.k_copies = 2
            self._store_cpu_int4(torch.cat([u >> 4, u & 15], 1), torch.cat([16 * scale, scale], 1),
                                 torch.cat([torch.zeros_like(scale), 8 * scale], 1))
        else:
            self._store_cpu_int4(q, scale, zero.float())

    def _store(self, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous(), persistent=False)

    def _store_cpu_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        pad = -q.shape[0] % CPU_ROW_MULTIPLE
        q, scale, zero = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self._store(w_int4=packed, scales_and_zeros=torch.stack([scale, zero], -1).transpose(0, 1)
                    .to(torch.bfloat16))

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str = "int8",
                 group_size: int | None = None) -> QuantizedLinear:
        """Quantize a float weight `[N, K]` by the formulas of the module docstring. int8: per output channel
        unless `group_size` is given; int4: `group_size` defaults to 64 or 32, whichever divides K first."""
        w = weight.detach().float()
        n, k = w.shape
        if mode == "int4":
            group_size = group_size or default_group_size({"weight": k})
        group_size = group_size or k
        if k % group_size:
            raise ValueError(f"group_size {group_size} does not divide K={k}")
        wg = w.reshape(n, k // group_size, group_size)
        if mode == "int8":
            scale = wg.abs().amax(-1) / 127
            scale = _stored(scale, _scale_dtype(_backend(w, scale), scale))
            q = (wg / scale.where(scale > 0, 1.0)[..., None]).round().clamp(-127, 127)
            return cls("int8", q.to(torch.int8).view(n, k), scale, None, group_size, bias)
        if mode != "int4":
            raise ValueError(f"mode must be 'int8' or 'int4', not {mode!r}")
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / 15
        backend = _backend(w, scale, lo)
        if backend == "torch":
            scale, zero = _stored(scale, torch.bfloat16), _stored(lo + 8 * scale, torch.bfloat16)
        else:  # ours and Triton's form keep min = zero - 8 * scale
            dtype = _scale_dtype(backend, scale, lo)
            scale, lo = _stored(scale, dtype), _stored(lo, dtype)
            zero = lo + 8 * scale
        q = ((wg - zero[..., None]) / scale.where(scale > 0, 1.0)[..., None]).round() + 8
        return cls.from_int4(q.clamp(0, 15).to(torch.uint8).view(n, k), scale, zero, group_size, bias)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Pre-quantized int4: q `[N, K]` in 0..15, `w = (q - 8) * scale + zero`, scale/zero `[N, K/group]`."""
        if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
            raise ValueError("int4 values must lie in 0..15")
        return cls("int4", q, scale, zero, group_size, bias)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                  bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Pre-quantized int8: q `[N, K]`, `w = q * scale`; scale `[N]` (per channel) or `[N, K/group_size]`."""
        if group_size is None:
            return cls("int8", q, scale.reshape(-1, 1), None, q.shape[1], bias)
        return cls("int8", q, scale, None, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.backend == "cpu":  # the bias is added inside, in fp32
            if self.mode == "int4" and self.w_int4.dim() == 3:  # interleaved
                y = torch.ops.llmengine_cpu.q4x8_linear(x, self.w_int4, self.d, self.m, self.bias)
            elif self.mode == "int4":
                y = torch.ops.llmengine_cpu.q4_linear(x, self.w_int4, self.d, self.m, self.bias)
            elif self.w_int8.dim() == 3:  # interleaved
                y = torch.ops.llmengine_cpu.q8x8_linear(x, self.w_int8, self.d, self.bias)
            else:
                y = torch.ops.llmengine_cpu.q8_linear(x, self.w_int8, self.d, self.bias)
            return y.view(*shape[:-1], self.out_features)
        if self.backend == "triton":
            if self.mode == "int4":
                y = w4a16_matmul(x, self.w_int4, self.scale, self.min, self.group_size)
            else:
                y = w8a16_matmul(x, self.w_int8, self.scale, self.group_size)
        else:
            xb = x.to(torch.bfloat16).contiguous()
            if hasattr(self, "w_int8"):
                y = torch.ops.aten._weight_int8pack_mm(_torch_int8_input(xb, self.w_int8.shape[1]), self.w_int8,
                                                       self.scale)
            else:
                xb = xb.repeat(1, self.k_copies) if self.k_copies > 1 else xb
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.w_int4, self.group_size,
                                                               self.scales_and_zeros)
                if y.shape[1] != self.out_features:
                    y = y[:, :self.out_features].contiguous()
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The fp32 weight `[N, K]` this layer multiplies by (its stored scales, rounding included)."""
        g = self.group_size
        if self.backend == "cpu":
            if self.mode == "int4":
                qs, d, m = self.w_int4, self.d, self.m
                if qs.dim() == 3:  # interleaved
                    qs, d, m = deinterleave8(qs, d, m)
                return unpack_int4(qs).float() * _groups(d.float(), BLOCK) + _groups(m.float(), BLOCK)
            qs, d = self.w_int8, self.d
            if qs.dim() == 3:  # interleaved
                qs, d = deinterleave8_q8(qs, d)
            return qs[:, :self.in_features].float() * _groups(d.float(), BLOCK)[:, :self.in_features]
        if self.backend == "triton":
            scale = _groups(self.scale.float().t(), g)[:, :self.in_features]
            if self.mode == "int4":
                return unpack_int4(self.w_int4).float() * scale + _groups(self.min.float().t(), g)
            return self.w_int8.float() * scale
        if hasattr(self, "w_int8"):
            return self.w_int8[:, :self.in_features].float() * self.scale.float()[:, None]
        sz = self.scales_and_zeros.float().transpose(0, 1)
        w = (self._cpu_int4_codes() - 8) * _groups(sz[..., 0], g) + _groups(sz[..., 1], g)
        w = w[:self.out_features]
        return w if self.k_copies == 1 else w.view(self.out_features, 2, self.in_features).sum(1)

    def _cpu_int4_codes(self) -> torch.Tensor:
        """The packed CPU q's as fp32 `[N_padded, K']`, read back exactly through the kernel itself: an identity
        input with scale 1, zero 8 makes it return q (torch's packed layout is its own business)."""
        k = self.w_int4.shape[1] * 2
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(k // self.group_size,
                                                                      self.scales_and_zeros.shape[1], 2).contiguous()
        rows = [torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.w_int4, self.group_size, unit)
                for eye in torch.eye(k, dtype=torch.bfloat16).split(512)]
        return torch.cat(rows).t().float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")


def default_group_size(in_features: dict[str, int]) -> int:
    """The largest of 64, 32 that divides every K (`{layer name: K}`); ValueError naming a layer otherwise."""
    for g in DEFAULT_GROUP_SIZES:
        if all(k % g == 0 for k in in_features.values()):
            return g
    name, k = next((name, k) for name, k in in_features.items() if k % DEFAULT_GROUP_SIZES[-1])
    raise ValueError(f"int4 needs a group size dividing every K: {name} has K={k}, which neither 64 nor 32 "
                     "divides; pass group_size, or quantize to int8")


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None, include_head: bool = True) -> None:
    """Replace every `models.layers.Linear` of the model by a QuantizedLinear, in place.

    With `include_head`, a tied head (`model.lm_head is None`) gets `model.quantized_head`, a quantized copy of
    `model.embed.weight` that `CausalLM.compute_logits` uses first; `lm_head` stays None (still "tied") and the
    embedding stays as it is for the lookups. Quantize before the weights are packed for oneDNN: a packed Linear
    (`packed_index` set, weight on the meta device) is refused.
    """
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, Linear) and (include_head or name != "lm_head")}
    for name, m in linears.items():
        if m.packed_index is not None or m.weight.is_meta:
            raise ValueError(f"{name}: its weight was packed for oneDNN (or is on the meta device); "
                             "quantize the model before packing its weights")
    tied_head = include_head and getattr(model, "lm_head", False) is None
    if mode == "int4" and group_size is None:
        ks = {name: m.in_features for name, m in linears.items()}
        if tied_head:
            ks["lm_head (tied)"] = model.embed.weight.shape[1]
        group_size = default_group_size(ks)
    for name, m in linears.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantizedLinear.quantize(m.weight, m.bias, mode, group_size))
    if tied_head:
        model.quantized_head = QuantizedLinear.quantize(model.embed.weight, None, mode, group_size)
