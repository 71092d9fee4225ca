"""decode_attention: Triton split-KV decode over the paged cache vs a float64 reference. Small key tiles
(16) keep the interpreter fast; lengths sit on and one past block and split boundaries."""

import pytest
import torch
from kernel_testing import ATTN_TOL, DTYPES, alibi_slopes, assert_close, randn

from llmengine_runtime.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from llmengine_runtime.kernels.testing import make_paged_cache
from tests.fast import fast_subset

CASES = {
    # name: dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, num_splits, alibi
    "mha-fp16-1split": ("fp16", 4, 4, 64, 16, [1, 16, 17, 50], 1, False),
    "gqa-bf16-bs32-3splits": ("bf16", 8, 2, 64, 32, [32, 33, 1, 70], 3, False),
    "falcon7b-mqa71-fp16": ("fp16", 71, 1, 64, 16, [5, 40], 2, False),
    "mha-alibi-fp32-empty-splits": ("fp32", 4, 4, 64, 16, [3, 31, 64], 8, True),
    "gqa-alibi-bf16": ("bf16", 8, 4, 64, 16, [18, 47], 2, True),
    "hd80-gqa-fp16": ("fp16", 6, 2, 80, 16, [17, 33], 2, False),
    "hd96-mqa-bf16": ("bf16", 4, 1, 96, 32, [40], 1, False),
    "hd128-mha-fp32": ("fp32", 2, 2, 128, 16, [16, 2], 2, False),
}


def make_inputs(dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, alibi, device):
    gen = torch.Generator().manual_seed(6)
    q = randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device, gen=gen)
    k_cache, v_cache, block_tables = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype,
                                                      device, gen)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    slopes = alibi_slopes(num_heads, device) if alibi else None
    return q, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5, slopes


def reference(q, k_cache, v_cache, block_tables, seq_lens, scale, slopes):
    return decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens, scale,
                                None if slopes is None else slopes.double())


@pytest.mark.parametrize("case", fast_subset(CASES, ["gqa-bf16-bs32-3splits"]))
def test_decode_attention(device, case):
    dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, num_splits, alibi = CASES[case]
    args = make_inputs(DTYPES[dtype], num_heads, num_kv_heads, head_dim, block_size, seq_lens, alibi, device)
    out = decode_attention_triton(*args, num_splits=num_splits, block_n=16)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_close(out, reference(*args), ATTN_TOL[DTYPES[dtype]])


def test_decode_attention_into_out(device):
    args = make_inputs(torch.float16, 8, 2, 64, 16, [17, 3], False, device)
    out = torch.full_like(args[0], float("nan"))
    result = decode_attention_triton(*args, out=out, num_splits=2, block_n=16)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, reference(*args), ATTN_TOL[torch.float16])


def test_decode_attention_default_tiles_through_entry_point(device, force_triton):
    from llmengine_runtime.kernels import decode_attention

    args = make_inputs(torch.bfloat16, 8, 2, 64, 16, [1, 65, 130], True, device)
    assert_close(decode_attention(*args), reference(*args), ATTN_TOL[torch.bfloat16])
