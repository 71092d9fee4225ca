"""Sliding-window attention (a query at position p sees keys p - W + 1 .. p) in every attention kernel: the torch
references against a brute-force float64 loop written here; the C++ paged attention (kernels/cpu/attention.cpp) and
the Triton prefill and decode kernels (under the interpreter on CPU; unverified on a GPU here) against the float64
references. Windows of 1, below, at and above the cache block (16) and the C++ key chunk (128), and wider than every
sequence; ragged lengths on and across block and chunk boundaries; ALiBi with a window. The C++ kernel also keeps
its promise with a window: each row is bit for bit its decode step alone, whatever the batch and thread count."""

import pytest
import torch
from kernel_testing import ATTN_TOL, alibi_slopes, assert_close, randn

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.cached_attention import cached_attention_ref
from llmengine_runtime.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from llmengine_runtime.kernels.prefill_attention import gather_context, prefill_attention_ref, prefill_attention_triton
from llmengine_runtime.kernels.testing import make_paged_cache
from tests.fast import fast_subset

WINDOWS = [1, 5, 16, 40, 128, 129, 200, 10_000]
# (seq_len after the step, new rows) per sequence: a whole prompt past two chunks, chunks after prefixes, decodes
SEQS = [(300, 300), (130, 7), (129, 1), (17, 17), (1, 1), (257, 40)]


def brute_force(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int], window: int,
                slopes: torch.Tensor | None, scale: float) -> torch.Tensor:
    """float64, one row and head at a time: q `[n, H, d]` at `positions` over keys/values `[L, Hkv, d]`."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r, p in enumerate(positions):
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            k, v = keys[lo:p + 1, kvh].double(), values[lo:p + 1, kvh].double()
            scores = scale * (k @ q[r, h].double())
            if slopes is not None:
                scores = scores + float(slopes[h]) * (torch.arange(lo, p + 1, dtype=torch.float64) - p)
            out[r, h] = torch.softmax(scores, 0) @ v
    return out


def paged_case(heads: int, kv_heads: int, d: int, block_size: int, seqs, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lens = [total for total, _ in seqs]
    k_cache, v_cache, tables = make_paged_cache(lens, kv_heads, d, block_size, dtype, "cpu", gen)
    cu = torch.tensor([0] + [n for _, n in seqs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), heads, d, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu


def brute_force_paged(q, k_cache, v_cache, tables, lens, cu, window, slopes, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, total in enumerate(lens.tolist()):
        start, end = int(cu[s]), int(cu[s + 1])
        keys, values = gather_context(k_cache, tables[s], total), gather_context(v_cache, tables[s], total)
        positions = list(range(total - (end - start), total))
        out[start:end] = brute_force(q[start:end], keys, values, positions, window, slopes, scale)
    return out


@pytest.mark.parametrize("window", [1, 16, 129, 0])
def test_references_match_brute_force(window):
    """The torch references (cached, decode, prefill with a cached prefix) with a window equal the plain loop."""
    seqs = [(150, 20), (40, 1), (33, 33)]
    q, k_cache, v_cache, tables, lens, cu = paged_case(4, 2, 16, 16, seqs)
    slopes = alibi_slopes(4, "cpu") * 0.25
    scale = 16 ** -0.5
    expected = brute_force_paged(q, k_cache, v_cache, tables, lens, cu, window, slopes, scale)
    got = cached_attention_ref(q.double(), k_cache.double(), v_cache.double(), cu, tables, lens, scale,
                               slopes.double(), window)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    decode_rows = cu[1:] - 1  # each sequence's last row, as a decode step
    got = decode_attention_ref(q[decode_rows.long()].double(), k_cache.double(), v_cache.double(), tables, lens,
                               scale, slopes.double(), window)
    torch.testing.assert_close(got, expected[decode_rows.long()], rtol=1e-10, atol=1e-10)
    # prefill: the new rows' own K/V passed as k, v (here read back from the cache), the prefix from the cache
    new_k = torch.cat([gather_context(k_cache, tables[s], int(lens[s]))[int(lens[s]) - int(cu[s + 1] - cu[s]):]
                       for s in range(len(seqs))])
    new_v = torch.cat([gather_context(v_cache, tables[s], int(lens[s]))[int(lens[s]) - int(cu[s + 1] - cu[s]):]
                       for s in range(len(seqs))])
    got = prefill_attention_ref(q.double(), new_k.double(), new_v.double(), cu, k_cache.double(), v_cache.double(),
                                tables, lens, scale, slopes.double(), window)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


CPP_CASES = {  # heads, kv_heads, head_dim, block_size, alibi, cache dtype
    "gqa-bs16": (6, 2, 32, 16, False, torch.float32),
    "mqa-bs32-alibi-fp16": (4, 1, 16, 32, True, torch.float16),
}


@pytest.mark.parametrize("case", list(CPP_CASES))
@pytest.mark.parametrize("window", fast_subset(WINDOWS, [5, 16, 129]))
def test_cpp_paged_attention_matches_float64(built, case, window, threads):
    heads, kv_heads, d, block_size, alibi, dtype = CPP_CASES[case]
    q, k_cache, v_cache, tables, lens, cu = paged_case(heads, kv_heads, d, block_size, SEQS, dtype)
    slopes = alibi_slopes(heads, "cpu") * d ** -0.5 if alibi else None
    out = torch.ops.llmengine_cpu.paged_attention(q, k_cache, v_cache, tables, lens, cu, d ** -0.5, slopes, window)
    expected = cached_attention_ref(q.double(), k_cache.double(), v_cache.double(), cu, tables, lens, d ** -0.5,
                                    None if slopes is None else slopes.double(), window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if window < max(lens.tolist()):  # the window matters here: without it the answer differs
        assert not torch.allclose(out, torch.ops.llmengine_cpu.paged_attention(q, k_cache, v_cache, tables, lens,
                                                                               cu, d ** -0.5, slopes), atol=1e-3)


@pytest.mark.parametrize("window", fast_subset([1, 16, 40, 129], [40]))
def test_cpp_rows_are_their_decode_steps_bit_for_bit(built, window):
    """Row i attended in a prompt chunk equals a decode step of that row alone, on 1 and 2 threads, and inside a
    batch of single rows (split form) and a batch of whole chunks (tiled form)."""
    q, k_cache, v_cache, tables, lens, cu = paged_case(4, 2, 32, 16, SEQS)
    scale = 32 ** -0.5
    torch.set_num_threads(2)
    out = torch.ops.llmengine_cpu.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, None, window)
    rows = [(s, int(cu[s]) + i, int(lens[s]) - int(cu[s + 1] - cu[s]) + i + 1)
            for s in range(len(SEQS)) for i in range(int(cu[s + 1] - cu[s]))]
    batch = torch.ops.llmengine_cpu.decode_attention(
        q[[r for _, r, _ in rows]], k_cache, v_cache, tables[[s for s, _, _ in rows]],
        torch.tensor([n for _, _, n in rows], dtype=torch.int32), scale, None, window)
    assert torch.equal(batch, out[[r for _, r, _ in rows]])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for s, r, keys in rows[::7] + rows[-3:]:
            alone = torch.ops.llmengine_cpu.decode_attention(q[r:r + 1], k_cache, v_cache, tables[s:s + 1],
                                                             torch.tensor([keys], dtype=torch.int32), scale, None,
                                                             window)
            assert torch.equal(alone[0], out[r]), f"row {r} ({keys} keys), {threads} threads"
    torch.set_num_threads(2)


TRITON_PREFILL = {  # dtype, heads, kv_heads, head_dim, block_size, q_lens, cached_lens, alibi
    "gqa-prefix-fp32": (torch.float32, 4, 2, 32, 16, [40, 1, 17], [5, 33, 0], False),
    "mha-nocache-alibi-fp16": (torch.float16, 2, 2, 32, 16, [50, 3], None, True),
}


@pytest.mark.parametrize("case", list(TRITON_PREFILL))
@pytest.mark.parametrize("window", fast_subset([1, 5, 16, 40, 10_000], [5, 40]))
def test_triton_prefill_matches_float64(device, case, window):
    dtype, heads, kv_heads, d, block_size, q_lens, cached, alibi = TRITON_PREFILL[case]
    gen = torch.Generator().manual_seed(3)
    n = sum(q_lens)
    q, k, v = (randn(n, h, d, dtype=dtype, device=device, gen=gen) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(device)
    caches = (None, None, None)
    if cached is not None:
        caches = make_paged_cache(cached, kv_heads, d, block_size, dtype, device, gen)
    lens = torch.tensor([c + m for c, m in zip(cached or [0] * len(q_lens), q_lens)], dtype=torch.int32).to(device)
    slopes = alibi_slopes(heads, device) if alibi else None
    out = prefill_attention_triton(q, k, v, cu, *caches, lens, d ** -0.5, slopes, block_m=16, block_n=16,
                                   window=window)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected = prefill_attention_ref(f64(q), f64(k), f64(v), cu, f64(caches[0]), f64(caches[1]), caches[2], lens,
                                     d ** -0.5, f64(slopes), window)
    assert_close(out, expected, ATTN_TOL[dtype])


@pytest.mark.parametrize("window", fast_subset([1, 5, 16, 40, 10_000], [5, 40]))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_matches_float64(device, window, num_splits):
    gen = torch.Generator().manual_seed(4)
    lens = [1, 16, 17, 70, 33]
    q = randn(len(lens), 8, 32, dtype=torch.float32, device=device, gen=gen)
    k_cache, v_cache, tables = make_paged_cache(lens, 2, 32, 16, torch.float32, device, gen)
    lens_t = torch.tensor(lens, dtype=torch.int32).to(device)
    slopes = alibi_slopes(8, device)
    out = decode_attention_triton(q, k_cache, v_cache, tables, lens_t, 32 ** -0.5, slopes, num_splits=num_splits,
                                  block_n=16, window=window)
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, lens_t, 32 ** -0.5,
                                    slopes.double(), window)
    assert_close(out, expected, ATTN_TOL[torch.float32])
