"""The `--deterministic` Triton kernels (kernels/deterministic*.py) under the interpreter (or on CUDA): each against a
float64 reference, and each row bit-identical (`==`) whatever the other rows, their number, its own place among
them, or whether it came as a decode row, in a whole prompt or in a prompt chunk after a cached prefix. Tiny shapes
and small key splits (32 keys, tiles of 16) keep the interpreter fast while crossing tile and split boundaries."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ATTN_TOL, DTYPES, alibi_slopes, assert_close, randn

from llmengine_runtime.kernels.deterministic_attention import deterministic_prefill_attention, fixed_split_attention
from llmengine_runtime.kernels.deterministic_matmul import deterministic_linear_ref, fixed_tile_matmul_triton
from llmengine_runtime.kernels.testing import make_paged_cache
from tests.fast import fast_subset

SPLIT, TILE = 32, 16  # keys per split and per tile in these tests
MATMUL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_fixed_tile_matmul_matches_float64_and_keeps_each_row(device, dtype):
    dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    k, n = 100, 70  # K crosses two tiles with a masked tail; N two column tiles
    x = randn(37, k, dtype=dtype, device=device, gen=gen)
    weight = randn(n, k, dtype=dtype, device=device, gen=gen) / k ** 0.5
    bias = randn(n, dtype=dtype, device=device, gen=gen)
    y = fixed_tile_matmul_triton(x, weight, bias)
    assert y.shape == (37, n) and y.dtype == dtype
    assert_close(y, deterministic_linear_ref(x, weight, bias), MATMUL_TOL[dtype])
    for rows in (torch.tensor([5]), torch.tensor([36, 0, 17]), torch.randperm(37, generator=gen)[:33]):
        assert torch.equal(fixed_tile_matmul_triton(x[rows.to(device)], weight, bias), y[rows.to(device)])
    assert torch.equal(fixed_tile_matmul_triton(x.view(1, 37, k), weight, None)[0],
                       fixed_tile_matmul_triton(x, weight, None))


def reference_rows(q, k_cache, v_cache, block_tables, seq_lens, scale, slopes, window):
    """Float64: row r at position seq_lens[r] - 1 over its table's keys (softmax written out)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    for r, length in enumerate(seq_lens.tolist()):
        pos = torch.arange(length)
        slots = block_tables[r].long().cpu()[pos // block_size] * block_size + pos % block_size
        keys = k_cache.cpu().double().flatten(0, 1)[slots].repeat_interleave(group, 1)  # [L, H, d]
        values = v_cache.cpu().double().flatten(0, 1)[slots].repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[r].cpu().double(), keys) * scale
        if slopes is not None:
            scores += slopes.cpu().double()[:, None] * (pos - (length - 1)).double()[None, :]
        if window > 0:
            scores[:, pos <= length - 1 - window] = float("-inf")
        out[r] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
    return out


CASES = {  # dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, alibi, window
    "gqa-fp32": ("fp32", 4, 2, 32, 16, [1, 31, 32, 33, 70], False, 0),
    "mqa-alibi-bf16": ("bf16", 4, 1, 32, 8, [17, 64, 65], True, 0),
    "mha-window-fp16": ("fp16", 2, 2, 64, 16, [5, 40, 97], False, 24),
}


def decode_inputs(case, device):
    dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, alibi, window = CASES[case]
    dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(7)
    q = randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device, gen=gen)
    k_cache, v_cache, tables = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    slopes = alibi_slopes(num_heads, device) if alibi else None
    return (q, k_cache, v_cache, tables, lens, head_dim ** -0.5, slopes, window), dtype


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_split_attention_matches_float64_and_keeps_each_row(device, case):
    args, dtype = decode_inputs(case, device)
    q, k_cache, v_cache, tables, lens, scale, slopes, window = args
    out = fixed_split_attention(*args, split_keys=SPLIT, block_n=TILE)
    assert_close(out, reference_rows(*args), ATTN_TOL[dtype])
    gen = torch.Generator().manual_seed(3)
    for rows in (torch.tensor([len(lens) - 1]), torch.randperm(len(lens), generator=gen)):
        rows = rows.to(device)
        alone = fixed_split_attention(q[rows], k_cache, v_cache, tables[rows], lens[rows], scale, slopes, window,
                                      split_keys=SPLIT, block_n=TILE)
        assert torch.equal(alone, out[rows])
    wider = torch.cat([tables, tables[:, :1].expand(-1, 9)], 1)  # more splits in the grid: same rows
    assert torch.equal(fixed_split_attention(q, k_cache, v_cache, wider, lens, scale, slopes, window,
                                             split_keys=SPLIT, block_n=TILE), out)


def test_fixed_split_attention_default_split_matches_float64(device):
    args, dtype = decode_inputs("gqa-fp32", device)
    assert_close(fixed_split_attention(*args), reference_rows(*args), ATTN_TOL[dtype])


@pytest.mark.parametrize("case", fast_subset(["gqa-fp32", "mha-window-fp16"], []))  # Triton interpreter: ~6 s each
def test_prompt_rows_equal_decode_rows_for_any_chunking(device, case):
    """Sequences of L tokens whose K/V fill the cache: every token's attention computed as a decode row, in one
    whole cache-less prompt, and in prompt chunks after a cached prefix (two chunkings, sequences packed
    together), bit-identical."""
    dtype, num_heads, num_kv_heads, head_dim, block_size, _, alibi, window = CASES[case]
    dtype = DTYPES[dtype]
    lengths = [37, 9]
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, tables = make_paged_cache(lengths, num_kv_heads, head_dim, block_size, dtype, device, gen)
    scale, slopes = head_dim ** -0.5, alibi_slopes(num_heads, device) if alibi else None
    q = [randn(n, num_heads, head_dim, dtype=dtype, device=device, gen=gen) for n in lengths]
    pos = [torch.arange(n) for n in lengths]
    slots = [tables[i].long().cpu()[p // block_size] * block_size + p % block_size for i, p in enumerate(pos)]
    k = [k_cache.flatten(0, 1)[s.to(device)] for s in slots]
    v = [v_cache.flatten(0, 1)[s.to(device)] for s in slots]

    def as_decode(i: int) -> torch.Tensor:  # every position of sequence i as its own decode row
        n = lengths[i]
        rows_tables = tables[i:i + 1].expand(n, -1).contiguous()
        return fixed_split_attention(q[i], k_cache, v_cache, rows_tables, (pos[i] + 1).to(torch.int32).to(device),
                                     scale, slopes, window, split_keys=SPLIT, block_n=TILE)

    decode = [as_decode(i) for i in range(2)]
    assert_close(decode[0], reference_rows(q[0], k_cache, v_cache, tables[:1].expand(37, -1), pos[0] + 1, scale,
                                           slopes, window), ATTN_TOL[dtype])
    # whole prompts, no cache: both sequences packed in one call
    cu = torch.tensor([0, 37, 46], dtype=torch.int32, device=device)
    whole = deterministic_prefill_attention(torch.cat(q), torch.cat(k), torch.cat(v), cu, None, None, None,
                                            torch.tensor(lengths, dtype=torch.int32, device=device), scale, slopes,
                                            window=window, split_keys=SPLIT, block_n=TILE)
    assert torch.equal(whole, torch.cat(decode))
    # chunks after a cached prefix: sequence 0 from position `done` on, sequence 1 from `done1` on
    for done, chunk, done1 in ((0, 20, 3), (20, 17, 8), (31, 5, 0)):
        end, length1 = done + chunk, 9
        parts_q = torch.cat([q[0][done:end], q[1][done1:]])
        parts_k = torch.cat([k[0][done:end], k[1][done1:]])
        parts_v = torch.cat([v[0][done:end], v[1][done1:]])
        cu = torch.tensor([0, chunk, chunk + length1 - done1], dtype=torch.int32, device=device)
        lens = torch.tensor([end, length1], dtype=torch.int32, device=device)
        out = deterministic_prefill_attention(parts_q, parts_k, parts_v, cu, k_cache, v_cache, tables, lens,
                                              scale, slopes, window=window, split_keys=SPLIT, block_n=TILE)
        assert torch.equal(out[:chunk], decode[0][done:end]), (done, chunk)
        assert torch.equal(out[chunk:], decode[1][done1:]), (done, chunk)


@pytest.fixture
def deterministic_mode(monkeypatch, force_triton):
    """--deterministic, with CPU tensors sent to the Triton paths (the interpreter)."""
    from llmengine_runtime.kernels.deterministic import ENV, set_deterministic

    monkeypatch.setenv(ENV, "0")  # restored after the test, as set_deterministic writes it
    set_deterministic(True)
    yield
    set_deterministic(False)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_rows_do_not_depend_on_the_row_count(device, deterministic_mode, mode):
    """By default rows <= 4 take the GEMV-shaped program and BLOCK_M follows M; under --deterministic one tiled
    program with one BLOCK_M: a decode row (M = 1) equals its row in a prompt's product."""
    from llmengine_runtime.kernels.quant_matmul import w4a16_matmul, w8a16_matmul
    from tests.kernels.test_kernel_quant_matmul import make_weights

    gen = torch.Generator().manual_seed(5)
    weights, w = make_weights(mode, 80, 128, 32, device, gen)
    x = randn(37, 128, dtype=torch.float32, device=device, gen=gen)  # fp32 out: the default paths' rows differ
    product = w4a16_matmul if mode == "int4" else w8a16_matmul
    y = product(x, *weights, 32)
    assert_close(y, (x.double().cpu() @ w.T), 1e-3)
    for rows in ([3], [0, 36, 7], list(range(20))):
        assert torch.equal(product(x[rows], *weights, 32), y[rows]), rows


def test_entry_points_take_the_deterministic_paths(device, deterministic_mode):
    """decode_attention, prefill_attention and deterministic_matmul.linear under the switch: the fixed-split
    attention and the fixed-tile product (default splits and tiles)."""
    from llmengine_runtime.kernels import decode_attention, prefill_attention
    from llmengine_runtime.kernels.deterministic_matmul import linear

    args, _ = decode_inputs("gqa-fp32", device)
    q, k_cache, v_cache, tables, lens, scale, slopes, window = args
    assert torch.equal(decode_attention(q, k_cache, v_cache, tables, lens, scale, slopes),
                       fixed_split_attention(q, k_cache, v_cache, tables, lens, scale, slopes))
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)  # one new token per sequence
    assert torch.equal(prefill_attention(q, q[:, :2], q[:, :2], cu, k_cache, v_cache, tables, lens, scale, slopes),
                       fixed_split_attention(q, k_cache, v_cache, tables, lens, scale, slopes))
    gen = torch.Generator().manual_seed(2)
    x, weight = randn(9, 48, dtype=torch.float32, device=device, gen=gen), randn(20, 48, dtype=torch.float32,
                                                                                  device=device, gen=gen)
    assert torch.equal(linear(x, weight), fixed_tile_matmul_triton(x, weight))
    assert torch.equal(linear(x[4:5], weight), linear(x, weight)[4:5])
