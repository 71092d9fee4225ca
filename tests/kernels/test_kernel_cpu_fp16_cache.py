"""The C++ CPU kernels with an fp16 KV cache (kernels/cpu/kv_rows.h): stores round as torch's `.to(float16)` does,
bit for bit, and mixed or unsupported cache types are refused or sent to the reference. (Decode attention over fp16
rows is test_kernel_cpu.py's test_decode_attention, with both cache types.)"""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.decode_attention import decode_attention, decode_attention_ref
from llmengine_runtime.kernels.store_kv import store_kv, store_kv_ref
from llmengine_runtime.kernels.testing import make_paged_cache

ops = torch.ops.llmengine_cpu


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


def test_store_kv_rounds_as_torch():
    """Ties, fp16 subnormals, overflow to inf, a skipped slot and a block boundary; head_dim 12 leaves a scalar tail."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(6, 2, 12, generator=gen) * torch.tensor([1.0, 1e-6, 3e4, 1e5, 1.0, 2.0 ** -24])[:, None, None]
    v = torch.randn(6, 2, 12, generator=gen)
    k[0, 0, :4] = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65520.0, -65519.0])  # ties to even, the edge of inf
    slots = torch.tensor([15, 16, -1, 63, 0, 31])
    k_cache, v_cache = torch.zeros(4, 16, 2, 12, dtype=torch.float16), torch.zeros(4, 16, 2, 12, dtype=torch.float16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.int16), k_ref.view(torch.int16))
    assert torch.equal(v_cache.view(torch.int16), v_ref.view(torch.int16))
    assert k_cache.isinf().any() and (k_cache != 0).sum() > 0


def test_fp16_cache_error_names_what_is_accepted():
    k_cache, v_cache, block_tables = make_paged_cache([20], 2, 16, 16, torch.float16, "cpu")
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="both fp32 or both fp16"):
        ops.decode_attention(q, k_cache, v_cache.float(), block_tables, torch.tensor([20], dtype=torch.int32), 0.25,
                             None)
    with pytest.raises(RuntimeError, match="both fp32 or both fp16"):
        ops.store_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), k_cache, v_cache.bfloat16(), torch.tensor([0]))


def test_bf16_caches_take_the_reference():
    """A cache type the C++ kernels do not hold goes to the torch reference, which converts as it reads."""
    k_cache, v_cache, block_tables = make_paged_cache([20, 3], 2, 16, 16, torch.bfloat16, "cpu")
    q = torch.randn(2, 4, 16)
    lens = torch.tensor([20, 3], dtype=torch.int32)
    out = decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25)
    torch.testing.assert_close(out, decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.25))
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    store_kv(k, v, k_cache, v_cache, torch.tensor([40, 41]))
    assert torch.equal(k_cache.view(-1, 2, 16)[40:42], k.bfloat16())
