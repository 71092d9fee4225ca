"""The k-quants' reference quantizers (llama.cpp `quantize_row_q{2..6}_K_ref`): super-blocks of 256 weights.

Each function takes `x [256, S]` float32 (element-major: column s is super-block s) and returns `[S, bytes]`
uint8 in the GGUF block layout. Sub-blocks are searched for a scale (and min) first, in float32 with the C's
order of operations (see gguf_quantize.py), then those scales are quantized against one fp16 super-scale and
every weight is re-rounded against its sub-block's stored scale:
- Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176: d, dmin, scales[12], qh[32], qs[128]): 8
  sub-blocks of 32, `w = d * sc_j * q - dmin * m_j`; sc_j and m_j are 6-bit (`pack_scales_6bit`) and come
  from `make_qkx2_quants`, a search over 21 (16) candidate scales weighted by `av_x + |x|`.
- Q6_K (210: ql[128], qh[64], int8 scales[16], d): 16 sub-blocks of 16, `w = d * sc_j * (q - 32)`, the
  scale from `make_qx_quants` (19 candidate scales, weights x^2).
- Q2_K (84: scales[16], qs[64], d, dmin): 16 sub-blocks of 16, 2-bit q and 4-bit sc/m, make_qkx2 with |x|
  weights and absolute errors. Q3_K (110: hmask[32], qs[64], scales[12], d): 16 of 16, `make_q3_quants`.
"""

from __future__ import annotations

import numpy as np
import torch

from llmengine_runtime.models.gguf_quantize_blocks import (
    MAGIC_ROUND,
    first_absmax,
    fp16_bytes,
    fp16_round,
    nearest_int,
    rdiv,
    sequential_sum,
)

QK_K = 256
GROUP_MAX_EPS = 1e-15


def sub_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """`[256, S]` -> `[n, (256 / n) * S]`: sub-block j of super-block s is column `j * S + s`."""
    return x.view(QK_K // n, n, -1).permute(1, 0, 2).reshape(n, -1)


def super_blocks(codes: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """The inverse of `sub_blocks`, for `[n, (256 / n) * S]` codes."""
    return codes.view(n, QK_K // n, s).permute(1, 0, 2).reshape(QK_K, s)


def as_bytes(fields: torch.Tensor) -> torch.Tensor:
    """`[m, S]` integer fields -> `[S, m]` uint8 (each field already 0..255)."""
    return fields.t().to(torch.uint8)


def _f32_chain(*terms: float) -> float:
    """Left-to-right float32 sum of already-float32 terms, as the C evaluates `a + b + c`."""
    acc = np.float32(terms[0])
    for t in terms[1:]:
        acc = np.float32(acc + np.float32(t))
    return float(acc)


def _round_clamp_(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """In place: `clamp(nearest_int(v), lo, hi)` as float32 (the magic number's add and subtract)."""
    return v.add_(MAGIC_ROUND).sub_(MAGIC_ROUND).clamp_(lo, hi)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and min of each `[n, B]` block minimizing the weighted error of `w = scale * q + min`, q in
    0..nmax: the min/max start, then `nstep + 1` candidate scales `(rmin + rdelta * is + nmax) / (max - min)`
    (min as last accepted), each refit by weighted least squares (min clamped to <= 0) and kept if its error is
    lower. Returns (scale [B], -min [B], codes [n, B] as float32)."""
    lo, hi = x.amin(0), x.amax(0)
    sum_w = sequential_sum(w)
    sum_x = sequential_sum(w * x)
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo
    codes, wl, term = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    wl_rows, term_rows = wl.unbind(0), term.unbind(0)

    def error_of(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        torch.mul(codes, scale, out=term).add_(offset).sub_(x)
        term.abs_() if use_mad else term.mul_(term)
        term.mul_(w)
        return sequential_sum(term_rows)

    best_iscale = rdiv(nmax, hi - lo)
    scale, best_lo = rdiv(1.0, best_iscale), lo
    _round_clamp_(torch.sub(x, lo, out=codes).mul_(best_iscale), 0, nmax)
    best = error_of(scale, lo)
    f_rmin, f_rdelta = np.float32(rmin), np.float32(rdelta)
    for step in range(nstep + 1):
        iscale = rdiv(_f32_chain(f_rmin, f_rdelta * np.float32(step), nmax), hi - lo)
        _round_clamp_(torch.sub(x, lo, out=codes).mul_(iscale), 0, nmax)
        torch.mul(w, codes, out=wl)
        sum_l = sequential_sum(wl_rows)
        torch.mul(wl, codes, out=term)
        sum_l2 = sequential_sum(term_rows)
        torch.mul(wl, x, out=term)
        sum_xl = sequential_sum(term_rows)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        error = error_of(this_scale, this_min)
        take = (det > 0) & (error < best) & ~flat
        best = torch.where(take, error, best)
        best_iscale, best_lo = torch.where(take, iscale, best_iscale), torch.where(take, lo, best_lo)
        scale = torch.where(take, this_scale, scale)
        lo = torch.where(take, this_min, lo)
    _round_clamp_(torch.sub(x, best_lo, out=codes).mul_(best_iscale), 0, nmax)  # the kept candidate's codes
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale, -lo, codes


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale of each `[n, B]` block, `x ~ scale * (q - nmax)` with q in 0..2 nmax - 1, weights x^2
    (llama.cpp's rmse_type 1): `-nmax / max` and the 18 scales `-(nmax + 0.1 is) / max`, is = +-1..9, each
    refit by least squares, the best kept. Returns (scale [B], codes [n, B] float32); an all-zero block: 0, 0."""
    peak = first_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    level, term = torch.empty_like(x), torch.empty_like(x)
    term_rows = term.unbind(0)

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _round_clamp_(torch.mul(x, iscale, out=level), -nmax, nmax - 1)
        torch.mul(wx, level, out=term)
        sum_lx = sequential_sum(term_rows)
        torch.mul(w, level, out=term).mul_(level)
        return sum_lx, sequential_sum(term_rows)

    best_iscale = rdiv(-nmax, peak)
    sum_lx, sum_l2 = trial(best_iscale)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = rdiv(-_f32_chain(nmax, np.float32(0.1) * np.float32(step)), peak)
        sum_lx, sum_l2 = trial(iscale)
        take = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        best_iscale = torch.where(take, iscale, best_iscale)
        scale = torch.where(take, sum_lx / sum_l2, scale)
        best = torch.where(take, scale * sum_lx, best)
    codes = _round_clamp_(torch.mul(x, best_iscale, out=level), -nmax, nmax - 1).add_(nmax)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, codes)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's symmetric search: start from `-nmax / max`, then up to 5 sweeps that move one code at a time to
    its least-squares level (weights x^2) when that raises `sum_lx^2 / sum_l2`. Returns (scale [B], codes
    [n, B] float32, offset by nmax); an all-zero block: 0 and codes 0."""
    peak = first_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    level = nearest_int(rdiv(-nmax, peak) * x).clamp(-nmax, nmax - 1).to(torch.float32)
    sum_lx, sum_l2 = sequential_sum(wx * level), sequential_sum(w * level * level)
    for _ in range(5):  # a sweep that changes nothing leaves the next one nothing to change: the C's break
        for i in range(x.shape[0]):
            old = level[i]
            slx = sum_lx - wx[i] * old
            sl2 = sum_l2 - w[i] * old * old
            new = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1).to(torch.float32)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            better = (sl2 > 0) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            take = (sum_lx - wx[i] * old > 0) & (new != old) & better
            level[i] = torch.where(take, new, old)
            sum_lx = torch.where(take, slx, sum_lx)
            sum_l2 = torch.where(take, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, level + nmax)


def _k_weights(xs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K search weights: `sqrt(sum x^2 / 32) + |x|` per sub-block of 32."""
    return torch.sqrt(sequential_sum(xs * xs) / 32.0) + xs.abs()


def _six_bit(values: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """`min(63, (uint8) nearest_int(63 / peak * v))`, 0 where peak is 0; `[8, S]` int32."""
    inverse = torch.where(peak > 0, rdiv(63.0, peak), torch.zeros_like(peak))
    return (nearest_int(inverse * values) & 0xFF).clamp(max=63)


def pack_scales_6bit(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins `[8, S]` -> the 12 scale bytes `[12, S]` of Q4_K / Q5_K: bytes 0-3 scale
    j < 4 (top 2 bits: scale j+4's high bits), 4-7 min j < 4 (top: min j+4's high), 8-11 the low nibbles of
    scale and min j+4."""
    low = torch.cat([ls[:4] | ((ls[4:] >> 4) << 6), lm[:4] | ((lm[4:] >> 4) << 6)])
    return torch.cat([low, (ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4)])


def _qkx_super_block(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K up to the codes: (d, dmin as stored fp16->f32 [S], scale bytes [12, S], codes [256, S])."""
    s = x.shape[1]
    xs = sub_blocks(x, 32)
    scales, mins, codes = make_qkx2_quants(xs, _k_weights(xs), nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.view(8, s), mins.view(8, s)
    max_scale = torch.where(scales.amax(0) > 0, scales.amax(0), torch.zeros(s))
    max_min = torch.where(mins.amax(0) > 0, mins.amax(0), torch.zeros(s))
    ls, lm = _six_bit(scales, max_scale), _six_bit(mins, max_min)
    d, dmin = fp16_round(max_scale / 63.0), fp16_round(max_min / 63.0)
    sub_d, sub_m = d * ls.to(torch.float32), dmin * lm.to(torch.float32)  # [8, S]
    codes = super_blocks(codes, 32, s).view(8, 32, s)
    again = nearest_int((x.view(8, 32, s) + sub_m[:, None]) / sub_d[:, None]).clamp(0, nmax).to(torch.float32)
    codes = torch.where((sub_d != 0)[:, None], again, codes).view(QK_K, s).to(torch.int32)
    return d, dmin, pack_scales_6bit(ls, lm), codes


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_bytes, codes = _qkx_super_block(x, 15, -1.0, 20)
    pairs = codes.view(4, 2, 32, -1)  # 64-weight chunks: byte l of chunk c = q[64c + l] | q[64c + 32 + l] << 4
    qs = (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(128, -1)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), as_bytes(scale_bytes), as_bytes(qs)], dim=1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_bytes, codes = _qkx_super_block(x, 31, -0.5, 15)
    pairs = codes.view(4, 2, 32, -1)
    qs = ((pairs[:, 0] & 15) | ((pairs[:, 1] & 15) << 4)).reshape(128, -1)
    high = (pairs >> 4).view(8, 32, -1)  # bit 2c of qh[l]: q[64c + l] > 15; bit 2c + 1: q[64c + 32 + l] > 15
    qh = (high << torch.arange(8).view(8, 1, 1)).sum(0)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), as_bytes(scale_bytes), as_bytes(qh), as_bytes(qs)], dim=1)


def _pack_quarters(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`[256, S]` codes -> `[64, S]` bytes: byte 32h + l = q[128h + l] | q[128h + 32 + l] << b | ... (4 codes)."""
    quarters = codes.view(2, 4, 32, -1)
    shifts = (torch.arange(4) * bits).view(1, 4, 1, 1)
    return (quarters << shifts).sum(1).reshape(64, -1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[1]
    scales, codes = make_qx_quants(sub_blocks(x, 16), 32)
    scales = scales.view(16, s)
    peak = first_absmax(scales)
    empty = peak.abs() < GROUP_MAX_EPS
    iscale = rdiv(-128.0, peak)
    d = fp16_round(rdiv(1.0, iscale))
    sc = nearest_int(iscale * scales).clamp(max=127)  # int8 -128..127
    sub_d = d * sc.to(torch.float32)
    codes = super_blocks(codes, 16, s).view(16, 16, s)
    again = nearest_int(x.view(16, 16, s) / sub_d[:, None]).clamp(-32, 31).to(torch.float32) + 32
    codes = torch.where((sub_d != 0)[:, None], again, codes).view(QK_K, s).to(torch.int32)
    quarters = codes.view(2, 4, 32, s)  # ql[64h + l] = q[128h+l] | q[128h+64+l] << 4; ql[64h+32+l]: +32, +96
    ql = torch.cat([(quarters[:, 0] & 15) | ((quarters[:, 2] & 15) << 4),
                    (quarters[:, 1] & 15) | ((quarters[:, 3] & 15) << 4)], dim=1).reshape(128, s)
    qh = _pack_quarters(codes >> 4, 2)
    out = torch.cat([as_bytes(ql), as_bytes(qh), as_bytes(sc & 0xFF), fp16_bytes(d)], dim=1)
    out[empty] = 0
    return out


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[1]
    xs = sub_blocks(x, 16)
    scales, mins, codes = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.view(16, s), mins.view(16, s)
    max_scale = torch.where(scales.amax(0) > 0, scales.amax(0), torch.zeros(s))
    max_min = torch.where(mins.amax(0) > 0, mins.amax(0), torch.zeros(s))
    has_scale, has_min = max_scale > 0, max_min > 0
    sc = torch.where(has_scale, nearest_int(rdiv(15.0, max_scale) * scales), 0)
    sc = (sc | (torch.where(has_min, nearest_int(rdiv(15.0, max_min) * mins), 0) << 4)) & 0xFF
    d = torch.where(has_scale, fp16_round(max_scale / 15.0), 0.0)
    dmin = torch.where(has_min, fp16_round(max_min / 15.0), 0.0)
    sub_d, sub_m = d * (sc & 0xF).to(torch.float32), dmin * (sc >> 4).to(torch.float32)
    codes = super_blocks(codes, 16, s).view(16, 16, s)
    again = nearest_int((x.view(16, 16, s) + sub_m[:, None]) / sub_d[:, None]).clamp(0, 3).to(torch.float32)
    codes = torch.where((sub_d != 0)[:, None], again, codes).view(QK_K, s).to(torch.int32)
    return torch.cat([as_bytes(sc), as_bytes(_pack_quarters(codes, 2)), fp16_bytes(d), fp16_bytes(dmin)], dim=1)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[1]
    scales, codes = make_q3_quants(sub_blocks(x, 16), 4)
    scales = scales.view(16, s)
    peak = first_absmax(scales)
    has_scale = peak != 0
    iscale = rdiv(-32.0, peak)
    ls = torch.where(has_scale, nearest_int(iscale * scales).clamp(-32, 31) + 32, 0)  # [16, S] 0..63
    d = torch.where(has_scale, fp16_round(rdiv(1.0, iscale)), 0.0)
    scale_bytes = torch.cat([(ls[:8] & 0xF) | ((ls[8:] & 0xF) << 4),
                             ((ls >> 4).view(4, 4, s) << (2 * torch.arange(4)).view(4, 1, 1)).sum(0)])
    sub_d = d * (ls - 32).to(torch.float32)
    codes = super_blocks(codes, 16, s).view(16, 16, s)
    again = nearest_int(x.view(16, 16, s) / sub_d[:, None]).clamp(-4, 3).to(torch.float32) + 4
    codes = torch.where((sub_d != 0)[:, None], again, codes).view(QK_K, s).to(torch.int32)
    high = (codes > 3).to(torch.int32).view(8, 32, s)  # bit b of hmask[m]: code 32b + m > 3
    hmask = (high << torch.arange(8).view(8, 1, 1)).sum(0)
    qs = _pack_quarters(codes & 3, 2)
    return torch.cat([as_bytes(hmask), as_bytes(qs), as_bytes(scale_bytes), fp16_bytes(d)], dim=1)
