"""The reference prefill batches the one-token sequences of a mixed step; it must equal one at a time."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.kernels.prefill_attention import prefill_attention_ref


@pytest.mark.parametrize("alibi", [False, True])
def test_mixed_step_batched_equals_per_sequence(alibi):
    torch.manual_seed(0)
    heads, kv_heads, d, bs = 6, 2, 16, 4
    k_cache = torch.randn(40, bs, kv_heads, d, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    q_lens, totals = [1, 3, 1, 2, 1], [6, 9, 10, 2, 13]  # decode, chunk after a prefix, decode, prompt, decode
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, d, dtype=torch.float64)
    k = torch.randn(sum(q_lens), kv_heads, d, dtype=torch.float64)
    v = torch.randn_like(k)
    tables = torch.randperm(40)[:20].view(5, 4).int()
    seq_lens = torch.tensor(totals, dtype=torch.int32)
    slopes = torch.rand(heads, dtype=torch.float64) if alibi else None
    batched = prefill_attention_ref(q, k, v, cu, k_cache, v_cache, tables, seq_lens, 0.25, slopes)
    for i in range(len(q_lens)):
        s, e = int(cu[i]), int(cu[i + 1])
        alone = prefill_attention_ref(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s], dtype=torch.int32),
                                      k_cache, v_cache, tables[i:i + 1], seq_lens[i:i + 1], 0.25, slopes)
        assert torch.allclose(batched[s:e], alone, atol=1e-12), i


@pytest.mark.parametrize("ctx_len, alibi", [(0, False), (5, False), (0, True)])
def test_cpu_reference_prompts_take_the_flash_kernel(ctx_len, alibi):
    """3-D or 5-D inputs send CPU SDPA down its math path: 4x slower at 1k tokens, and quadratic in memory.
    The reference must feed 4-D ones (benchmarks/RESULTS.md, long prompts)."""
    from torch.profiler import profile

    from llmengine_runtime.kernels.prefill_attention import attention_ref

    q, k, v = torch.randn(40, 6, 16), torch.randn(40 + ctx_len, 2, 16), torch.randn(40 + ctx_len, 2, 16)
    slopes = torch.rand(6) if alibi else None
    with profile() as prof:
        attention_ref(q, k, v, ctx_len, 0.25, slopes)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_cpu_reference_decode_attends_bf16_in_fp32():
    """CPU's bf16 SDPA kernel is ~4x slower than its fp32 one for one query: the references upcast, and still
    equal the float64 result to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmengine_runtime.kernels.decode_attention import decode_attention_ref
    from llmengine_runtime.kernels.prefill_attention import single_token_attention_ref

    class SdpaDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.name():
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(2, 12, 4, 2, 16, dtype=torch.float64)
    tables = torch.tensor([[3, 0, 7], [5, 1, 2]], dtype=torch.int32)
    q = torch.randn(2, 6, 16, dtype=torch.float64)
    seq_lens = torch.tensor([11, 6], dtype=torch.int32)
    expected = decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.25)
    with SdpaDtypes() as mode:
        got = decode_attention_ref(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, seq_lens, 0.25)
        single_token_attention_ref(q.bfloat16(), q[:, :2].bfloat16(), q[:, :2].bfloat16(), k_cache.bfloat16(),
                                   v_cache.bfloat16(), tables, seq_lens - 1, 0.25)
    assert mode.seen == [torch.float32, torch.float32]
    assert got.dtype == torch.bfloat16 and (got.double() - expected).abs().max() < 0.03


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, q_len, ctx_len", [(6, 2, 37, 100), (4, 4, 1, 16), (9, 3, 64, 1),
                                                              (8, 1, 130, 257)])
def test_cpu_chunk_after_a_prefix_equals_the_masked_float64_attention(dtype, tol, heads, kv_heads, q_len, ctx_len):
    """A chunk after a cached prefix is two unmasked flash calls (the prefix; the chunk, causally) merged by their
    log-sum-exps: the same as one attention with the causal mask, computed in float64."""
    from llmengine_runtime.kernels.prefill_attention import attention_ref

    gen = torch.Generator().manual_seed(q_len + ctx_len)
    q = torch.randn(q_len, heads, 32, generator=gen)
    k, v = torch.randn(2, ctx_len + q_len, kv_heads, 32, generator=gen)
    got = attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), ctx_len, 0.2, None)
    expected = attention_ref(q.double(), k.double(), v.double(), ctx_len, 0.2, None)  # the masked path
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
