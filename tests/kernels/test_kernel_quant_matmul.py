"""w4a16 / w8a16: the int4 layout, both Triton program shapes against a float64 reference, and dispatch."""

import pytest
import torch
from kernel_testing import DTYPES, INTERPRETED, randn

from llmengine_runtime.kernels import quant_matmul
from llmengine_runtime.kernels.quant_matmul import (
    pack_int4,
    unpack_int4,
    w4a16_matmul,
    w4a16_matmul_ref,
    w4a16_matmul_triton,
    w8a16_matmul,
    w8a16_matmul_ref,
    w8a16_matmul_triton,
)
from tests.fast import fast_subset

# The kernels multiply x (exact in its dtype) by exact integers with fp32 accumulation and apply the scales in
# fp32, then round y once to x's dtype: y is off the float64 result by at most one rounding of y (unit roundoff
# u; the interpreter truncates to bf16 instead, up to one ulp, 2^-7) plus the fp32 accumulation error, which
# 1e-5 * sum |x| |w| covers for these K (fp32 x runs tl.dot in tf32x3, ~fp32 accuracy). A wrong scale, group
# or nibble is off by the size of a weight times x, far above this.
OUT_ROUNDING = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                torch.bfloat16: 2.0 ** -7 if INTERPRETED else 2.0 ** -8}

# (mode, N, K, group): N ragged against BLOCK_N 64, K spanning several groups; int8 "K" groups is per channel,
# with K=80 ragged against the 64-wide K-step.
CASES = [("int4", 40, 96, 32), ("int4", 72, 192, 64), ("int8", 40, 80, 80), ("int8", 40, 96, 32)]


def assert_within(y: torch.Tensor, expected: torch.Tensor, abs_x_abs_w: torch.Tensor, dtype: torch.dtype) -> None:
    assert not y.isnan().any(), "unwritten output (NaN)"
    err = (y.double().cpu() - expected.cpu()).abs()
    bound = OUT_ROUNDING[dtype] * expected.cpu().abs() + 1e-5 * abs_x_abs_w.cpu()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst error/bound {(err / bound).max():.3g}"


def make_weights(mode: str, n: int, k: int, group: int, device, gen, scale_dtype=torch.float16):
    """Random weights in the kernel layout, and the float64 dequantized W `[N, K]`."""
    groups = k // group
    scale = (0.01 + 0.05 * torch.rand(groups, n, generator=gen)).to(scale_dtype)
    if mode == "int4":
        q = torch.randint(0, 16, (n, k), generator=gen)
        min_ = (-8 * scale.float() + 0.02 * torch.randn(groups, n, generator=gen)).to(scale_dtype)
        w = q.double() * scale.double().t().repeat_interleave(group, 1) \
            + min_.double().t().repeat_interleave(group, 1)
        return (pack_int4(q).to(device), scale.to(device), min_.to(device)), w
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w = q.double() * scale.double().t().repeat_interleave(group, 1)[:, :k]
    return (q.to(device), scale.to(device)), w


def run_triton(mode, x, weights, group, gemv):
    if mode == "int4":
        return w4a16_matmul_triton(x, *weights, group, gemv=gemv)
    return w8a16_matmul_triton(x, *weights, group, gemv=gemv)


def test_int4_layout_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))
    # byte j of each 32-k run: q[j] in the low nibble, q[16 + j] in the high one (GGUF's Q4 order)
    assert int(packed[1, 0]) == int(q[1, 0]) | int(q[1, 16]) << 4
    assert int(packed[2, 16 + 5]) == int(q[2, 32 + 5]) | int(q[2, 48 + 5]) << 4


@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "dot"])
@pytest.mark.parametrize("rows", fast_subset([1, 5, 33], [5]))
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-n{n}-k{k}-g{g}" for m, n, k, g in CASES])
def test_quant_matmul_vs_float64(device, case, rows, gemv):
    mode, n, k, group = CASES[case]
    dtype = list(DTYPES.values())[(case + rows) % 3]  # every dtype meets every case and row count once
    gen = torch.Generator().manual_seed(100 * case + rows)
    weights, w = make_weights(mode, n, k, group, device, gen)
    x = randn(rows, k + 8, dtype=dtype, device=device, gen=gen)[:, 3:k + 3]  # row stride > K
    y = run_triton(mode, x, weights, group, gemv)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert_within(y, x.double().cpu() @ w.t(), x.double().abs().cpu() @ w.abs().t(), dtype)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_reference_matches_float64(mode):
    gen = torch.Generator().manual_seed(7)
    weights, w = make_weights(mode, 24, 64, 32, "cpu", gen, scale_dtype=torch.float32)
    x = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    ref = w4a16_matmul_ref(x, *weights, 32) if mode == "int4" else w8a16_matmul_ref(x, *weights, 32)
    torch.testing.assert_close(ref, x @ w.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "dot"])
def test_fp32_scales(device, gemv):
    """Scales too small for fp16 are kept in fp32; the kernels take either."""
    gen = torch.Generator().manual_seed(3)
    weights, w = make_weights("int4", 24, 64, 32, device, gen, scale_dtype=torch.float32)
    x = randn(6, 64, dtype=torch.float32, device=device, gen=gen)
    y = w4a16_matmul_triton(x, *weights, 32, gemv=gemv)
    assert_within(y, x.double().cpu() @ w.t(), x.double().abs().cpu() @ w.abs().t(), torch.float32)


def test_no_rows(device):
    gen = torch.Generator().manual_seed(4)
    weights, _ = make_weights("int4", 24, 64, 32, device, gen)
    assert w4a16_matmul_triton(torch.empty(0, 64, device=device), *weights, 32).shape == (0, 24)


@pytest.mark.parametrize("forced", [False, True])
def test_dispatch(monkeypatch, forced):
    calls = []
    monkeypatch.setattr(quant_matmul, "w4a16_matmul_triton", lambda *args: calls.append("w4") or "triton")
    monkeypatch.setattr(quant_matmul, "w8a16_matmul_triton", lambda *args: calls.append("w8") or "triton")
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1" if forced else "0")
    gen = torch.Generator().manual_seed(5)
    w4, _ = make_weights("int4", 16, 32, 32, "cpu", gen)
    w8, _ = make_weights("int8", 16, 32, 32, "cpu", gen)
    x = torch.randn(2, 32)
    out4, out8 = w4a16_matmul(x, *w4, 32), w8a16_matmul(x, *w8, 32)
    if forced:
        assert calls == ["w4", "w8"] and out4 == out8 == "triton"
    else:
        assert calls == [] and out4.shape == out8.shape == (2, 16)
