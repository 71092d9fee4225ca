"""The interleaved int4 and int8 products on AMX int8 tiles (kernels/cpu/amx_interleaved.cpp) give the vector
path's numbers bit for bit, on fresh random weights and activations: ragged row counts (whole 16-row tiles beside
leftover rows, which int8 takes as one shorter tile from 4 rows and int4 from 12, each row count its own instance),
output ranges with odd group counts (whole 16-column pairs beside a lone group), K of one block and of several, with
and without bias (tests/models/test_fused_decode.py runs a whole model with AMX on and off). Where the build or the
CPU has no AMX, `set_amx(True)` says so and these tests skip (the vector path is tested everywhere else)."""

import os
import subprocess
import sys

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.cpu.reference import int8_blocks
from llmengine_runtime.kernels.quant_matmul import pack_int4
from llmengine_runtime.models.row_interleave import interleave8, interleave8_q8
from tests.fast import fast_subset

ops = torch.ops.llmengine_cpu


@pytest.fixture(autouse=True)
def amx():
    """AMX on for the test (skipped where there is none), back to the process's setting after it."""
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"
    before = ops.amx_enabled()
    if not ops.set_amx(True):
        ops.set_amx(before)
        pytest.skip("no AMX here: this build or CPU has no AMX int8 tiles, or Linux did not grant them")
    yield
    ops.set_amx(before)


def q4_weight(n: int, k: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Interleaved int4 weight and its float64 values [n, k]."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half()
    m = (torch.randn(n, k // 32, generator=gen) * 0.05).half()
    dense = q.double() * d.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)
    return interleave8(pack_int4(q), d, m), dense


def q8_weight(n: int, k: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half()
    return interleave8_q8(q, d), q.double() * d.double().repeat_interleave(32, 1)


def both_paths(product, x, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    ops.set_amx(True)
    on_tiles = product(x, *weight, bias)
    ops.set_amx(False)
    vector = product(x, *weight, bias)
    ops.set_amx(True)
    return on_tiles, vector


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("rows", fast_subset([4, 5, 8, 12, 15, 16, 17, 24, 28, 31, 33, 64, 70], [5, 28]))
@pytest.mark.parametrize("n", fast_subset([8, 24, 40, 64], [40]))
@pytest.mark.parametrize("k", fast_subset([32, 100, 576], [100]))
def test_tiles_give_the_vector_paths_bits(kind, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 10_000 + n * 100 + k + (kind == "q8"))
    k_weight = -(-k // 32) * 32  # the weight's blocks of 32 cover K (x is zero-padded past it)
    weight, dense = (q4_weight if kind == "q4" else q8_weight)(n, k_weight, gen)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen) if rows % 2 else None
    product = ops.q4x8_linear if kind == "q4" else ops.q8x8_linear
    on_tiles, vector = both_paths(product, x, weight, bias)
    assert torch.equal(on_tiles, vector)
    # and both are the product: x as quantized per block of 32, times the weights, in float64
    xq, xd = (t.double() for t in int8_blocks(torch.nn.functional.pad(x, (0, k_weight - k))))
    expected = (xq * xd[..., None]).reshape(rows, -1) @ dense.T + (0 if bias is None else bias.double())
    torch.testing.assert_close(on_tiles.double(), expected, rtol=1e-5, atol=1e-4)


def test_an_output_range_that_starts_inside_a_group():
    """The fused step hands each thread a column range; a range that starts or ends inside a group or a pair leaves
    those columns to the vector path, with the same bits."""
    gen = torch.Generator().manual_seed(5)
    weight, _ = q4_weight(1536, 576, gen)
    x = torch.randn(48, 576, generator=gen)
    on_tiles, vector = both_paths(ops.q4x8_linear, x, weight, None)
    assert torch.equal(on_tiles, vector)
    threads = torch.get_num_threads()
    try:
        for t in (3, 5, 7):  # at::parallel_for splits the groups unevenly, so ranges start at odd groups
            torch.set_num_threads(t)
            assert torch.equal(ops.q4x8_linear(x, *weight, None), vector)
    finally:
        torch.set_num_threads(threads)


def test_the_environment_turns_tiles_off():
    code = "import torch; from llmengine_runtime.kernels import cpu; assert cpu.available(); " \
           "print(torch.ops.llmengine_cpu.amx_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLMENGINE_AMX": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
