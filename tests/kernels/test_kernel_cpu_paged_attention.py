"""The C++ paged attention of any query rows (kernels/cpu/attention.cpp, kernels/cached_attention.py): against a
float64 reference on ragged prompt chunks over cached prefixes, across cache blocks and key chunks; and its promise,
that each row's output is bit for bit the decode step's for that row alone, whatever the batch, the row's place in
it, the schedule and the thread count."""

import pytest
import torch
from kernel_testing import alibi_slopes

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.cached_attention import cached_attention, cached_attention_ref
from llmengine_runtime.kernels.testing import make_paged_cache

ops = torch.ops.llmengine_cpu
CHUNK_KEYS = 128  # attention.cpp's: the lengths below cross it

CASES = {
    # name: num_heads, num_kv_heads, head_dim, block_size, [(seq_len after the step, new rows)], alibi
    "gqa-prompt-and-decodes": (9, 3, 64, 16, [(40, 40), (130, 1), (300, 7), (17, 17)], False),
    "mha-chunk-after-prefix": (4, 4, 32, 16, [(257, 130), (129, 1), (128, 2)], False),
    "mqa-alibi": (8, 1, 16, 32, [(70, 70), (5, 2)], True),
    "gqa-alibi-hd40": (4, 2, 40, 16, [(150, 33), (1, 1)], True),
    # query heads per KV head in kv_heads.h's groups (AVX-512: 4 + 3, 4 + 1), head dims whose
    # value lanes end off its 32-lane runs
    "gqa7-hd80": (14, 2, 80, 16, [(200, 5), (90, 1), (33, 33)], False),
    "gqa5-hd48-alibi": (10, 2, 48, 16, [(131, 9), (7, 1)], True),
}


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


def make_case(case: str, cache_dtype: torch.dtype, seed: int = 0):
    heads, kv_heads, d, block_size, seqs, alibi = CASES[case]
    gen = torch.Generator().manual_seed(seed + len(case))
    lens = [total for total, _ in seqs]
    k_cache, v_cache, block_tables = make_paged_cache(lens, kv_heads, d, block_size, cache_dtype, "cpu", gen)
    cu = torch.tensor([0] + [n for _, n in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), heads, d, generator=gen)
    slopes = alibi_slopes(heads, "cpu") * d ** -0.5 if alibi else None
    return q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), cu, d ** -0.5, slopes


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_match_the_float64_reference(case, cache_dtype, threads):
    q, k_cache, v_cache, tables, lens, cu, scale, slopes = make_case(case, cache_dtype)
    out = ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, slopes)
    expected = cached_attention_ref(q.double(), k_cache.double(), v_cache.double(), cu, tables, lens, scale,
                                    None if slopes is None else slopes.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached_attention(q, k_cache, v_cache, cu, tables, lens, scale, slopes), out)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_each_row_is_its_decode_step_bit_for_bit(case, cache_dtype):
    """Row i of a sequence is attended as a decode step at that position attends its one row: alone (batch of one),
    inside a shuffled batch of single rows, on one thread and on two."""
    q, k_cache, v_cache, tables, lens, cu, scale, slopes = make_case(case, cache_dtype)
    torch.set_num_threads(2)
    out = ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, slopes)
    rows, seq_of_row, keys_of_row = [], [], []
    for s in range(len(lens)):
        q_len = int(cu[s + 1] - cu[s])
        for i in range(q_len):
            rows.append(int(cu[s]) + i)
            seq_of_row.append(s)
            keys_of_row.append(int(lens[s]) - q_len + i + 1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [rows[j] for j in order]
    batch = ops.decode_attention(q[shuffled], k_cache, v_cache, tables[[seq_of_row[j] for j in order]],
                                 torch.tensor([keys_of_row[j] for j in order], dtype=torch.int32), scale, slopes)
    assert torch.equal(batch, out[shuffled])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for r, s, keys in zip(rows, seq_of_row, keys_of_row):
            alone = ops.decode_attention(q[r:r + 1], k_cache, v_cache, tables[s:s + 1],
                                         torch.tensor([keys], dtype=torch.int32), scale, slopes)
            assert torch.equal(alone[0], out[r]), f"row {r} (keys {keys}) on {threads} threads"
    torch.set_num_threads(2)


def test_a_chunk_of_rows_is_the_rows_of_a_longer_chunk():
    """The same positions fed as one 300-row prompt, as 3 chunks, or inside a batch with other sequences: equal."""
    heads, kv_heads, d = 9, 3, 64
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables = make_paged_cache([300, 90], kv_heads, d, 16, torch.float32, "cpu", gen)
    q = torch.randn(300, heads, d, generator=gen)
    whole = ops.paged_attention(q, k_cache, v_cache, tables[:1], torch.tensor([300], dtype=torch.int32),
                                torch.tensor([0, 300], dtype=torch.int32), 0.125, None)
    for start, end in ((0, 100), (100, 250), (250, 300)):
        part = ops.paged_attention(q[start:end], k_cache, v_cache, tables[:1], torch.tensor([end], dtype=torch.int32),
                                   torch.tensor([0, end - start], dtype=torch.int32), 0.125, None)
        assert torch.equal(part, whole[start:end])
    other = torch.randn(5, heads, d, generator=gen)
    mixed = ops.paged_attention(torch.cat([other, q[100:250]]), k_cache, v_cache, tables[[1, 0]],
                                torch.tensor([90, 250], dtype=torch.int32),
                                torch.tensor([0, 5, 155], dtype=torch.int32),
                                0.125, None)
    assert torch.equal(mixed[5:], whole[100:250])


def test_bad_row_counts_are_errors():
    k_cache, v_cache, tables = make_paged_cache([20], 2, 16, 16, torch.float32, "cpu")
    q = torch.randn(3, 2, 16)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must run from 0"):
        ops.paged_attention(q, k_cache, v_cache, tables, torch.tensor([20], dtype=torch.int32),
                            torch.tensor([0, 2], dtype=torch.int32), 0.25, None)
    with pytest.raises(RuntimeError, match="new tokens but"):
        ops.paged_attention(q, k_cache, v_cache, tables, torch.tensor([2], dtype=torch.int32),
                            torch.tensor([0, 3], dtype=torch.int32), 0.25, None)
