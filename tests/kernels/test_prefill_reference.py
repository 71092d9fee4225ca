"""The reference prefill batches the one-token sequences of a mixed step; it must equal one at a time."""

from __future__ import annotations

import pytest
import torch

from kernels.prefill_attention import prefill_attention_ref


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
