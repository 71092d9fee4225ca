"""prefill_attention: Triton varlen causal flash attention (with a paged cached prefix) vs a float64
reference. Small tiles (16 x 16) keep the interpreter fast and put the ragged lengths on and one past
tile and cache-block boundaries."""

import pytest
import torch
from kernel_testing import ATTN_TOL, DTYPES, alibi_slopes, assert_close, randn

from llmengine_runtime.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton
from llmengine_runtime.kernels.testing import make_paged_cache
from tests.fast import fast_subset

CASES = {
    # name: dtype, num_heads, num_kv_heads, head_dim, block_size, q_lens, cached_lens (None: no cache), alibi
    "mha-nocache-fp16": ("fp16", 4, 4, 64, 16, [1, 16, 17, 5], None, False),
    "gqa-prefix-bf16": ("bf16", 8, 2, 64, 16, [3, 1, 17, 16], [16, 17, 0, 5], False),
    "mqa-prefix-fp32-bs32": ("fp32", 4, 1, 64, 32, [2, 33], [32, 31], False),
    "mha-alibi-nocache-fp32": ("fp32", 4, 4, 64, 16, [20, 1], None, True),
    "gqa-alibi-prefix-fp16": ("fp16", 4, 2, 64, 16, [9, 1], [23, 40], True),
    "hd80-gqa-prefix-fp16": ("fp16", 4, 2, 80, 16, [17, 2], [3, 16], False),
    "hd96-mha-prefix-bf16": ("bf16", 2, 2, 96, 32, [5], [33], False),
    "hd128-mqa-prefix-fp32": ("fp32", 2, 1, 128, 16, [16, 1], [1, 20], False),
}


def make_inputs(dtype, num_heads, num_kv_heads, head_dim, block_size, q_lens, cached_lens, alibi, device):
    gen = torch.Generator().manual_seed(5)
    num_tokens = sum(q_lens)
    q = randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device, gen=gen)
    k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    v = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    if cached_lens is None:
        k_cache = v_cache = block_tables = None
        cached_lens = [0] * len(q_lens)
    else:  # the new tokens' own slots hold poison: the kernel must take them from k, v
        k_cache, v_cache, block_tables = make_paged_cache(cached_lens, num_kv_heads, head_dim, block_size,
                                                          dtype, device, gen)
    seq_lens = torch.tensor([c + n for c, n in zip(cached_lens, q_lens)], dtype=torch.int32).to(device)
    slopes = alibi_slopes(num_heads, device) if alibi else None
    return q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5, slopes


def reference(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale, slopes):
    f64 = lambda t: None if t is None else t.double()
    return prefill_attention_ref(f64(q), f64(k), f64(v), cu_seqlens_q, f64(k_cache), f64(v_cache),
                                 block_tables, seq_lens, scale, f64(slopes))


@pytest.mark.parametrize("case", fast_subset(CASES, ["gqa-prefix-bf16", "mha-alibi-nocache-fp32"]))
def test_prefill_attention(device, case):
    dtype, *rest = CASES[case]
    args = make_inputs(DTYPES[dtype], *rest, device=device)
    out = prefill_attention_triton(*args, block_m=16, block_n=16)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_close(out, reference(*args), ATTN_TOL[DTYPES[dtype]])


def test_prefill_attention_into_out_with_max_seqlen_hint(device):
    args = make_inputs(torch.float16, *CASES["gqa-prefix-bf16"][1:], device=device)
    out = torch.full_like(args[0], float("nan"))
    result = prefill_attention_triton(*args, max_seqlen_q=17, out=out, block_m=16, block_n=16)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, reference(*args), ATTN_TOL[torch.float16])


def test_prefill_attention_default_tiles_through_entry_point(device, force_triton):
    from llmengine_runtime.kernels import prefill_attention

    args = make_inputs(torch.bfloat16, *CASES["gqa-alibi-prefix-fp16"][1:], device=device)
    assert_close(prefill_attention(*args), reference(*args), ATTN_TOL[torch.bfloat16])


@pytest.mark.slow
@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
def test_prefill_attention_unequal_tiles(device, block_m, block_n):
    """Query tiles taller and shorter than key tiles: the causal loop must stop at the right key tile."""
    args = make_inputs(torch.float16, 4, 2, 64, 16, [40, 1, 33], [5, 16, 0], True, device=device)
    out = prefill_attention_triton(*args, block_m=block_m, block_n=block_n)
    assert_close(out, reference(*args), ATTN_TOL[torch.float16])
