"""Our C++ CPU kernels (kernels/cpu/) against float64 references on fresh random inputs: ragged row counts and
K's, block and chunk boundaries, GQA/MQA/ALiBi attention over shuffled paged caches, and their input checks."""

import re
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_testing import alibi_slopes

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.activation import silu_and_mul_ref
from llmengine_runtime.kernels.cpu.reference import int8_blocks
from llmengine_runtime.kernels.decode_attention import decode_attention, decode_attention_ref
from llmengine_runtime.kernels.norms import rms_norm_ref
from llmengine_runtime.kernels.quant_matmul import pack_int4
from llmengine_runtime.kernels.rotary import rotary_ref
from llmengine_runtime.kernels.store_kv import store_kv_ref
from llmengine_runtime.kernels.testing import make_paged_cache

ops = torch.ops.llmengine_cpu


@pytest.fixture(autouse=True, scope="module")
def built():
    # Not a skip: on a machine with a C++ compiler (CI's) the kernels must build.
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


# Registers that a build for each lower target must not use (make test-isa reruns these tests against such builds on
# a machine that has more): AVX-512's zmm and opmask registers above AVX2; any 256-bit register below it.
# VNNI's vpdpbusd is above both.
FORBIDDEN_REGISTERS = {"x86-64-v3": r"%zmm|%k[1-7]\b|vpdpbusd", "x86-64-v2": r"%ymm|%zmm|%k[1-7]\b|vpdpbusd"}


def test_the_build_holds_its_targets_instructions():
    """The library under test was built for LLMENGINE_CPU_MARCH: a lower target's build uses none of the registers
    above it, and a native build on an AVX2 machine has the AVX2 paths compiled in."""
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(cpu_kernels.library_path())],
                                 capture_output=True, text=True, check=True).stdout
    march = cpu_kernels.march()
    if march in FORBIDDEN_REGISTERS:
        used = sorted(set(re.findall(FORBIDDEN_REGISTERS[march], disassembly)))
        assert not used, f"a -march={march} build uses {used}"
    else:
        assert march == "native"
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split())
        assert ("%ymm" in disassembly) == ("avx2" in flags)
        # the quantized products' dot products take vpdpbusd where the CPU has it
        assert ("vpdpbusd" in disassembly) == bool({"avx512_vnni", "avx_vnni"} & flags)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xq, xd = int8_blocks(x)
    return xq.double(), xd.double()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 65, 130])
@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("k", [32, 96, 576])  # blocks: one alone; a pair and one alone; two groups of 8 and a pair
def test_q4_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 100 + n + k)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half()
    m = (torch.randn(n, k // 32, generator=gen) * 0.05).half()
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    xq, xd = quantize_activations(x)
    qb = q.view(n, -1, 32).double()
    expected = torch.einsum("mbj,nbj,nb,mb->mn", xq, qb, d.double(), xd) \
        + torch.einsum("mbj,nb,mb->mn", xq, m.double(), xd) + bias.double()
    y = ops.q4_linear(x, pack_int4(q), d, m, bias)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 7, 70])
@pytest.mark.parametrize("k", [32, 40, 96])  # 40: K padded with zero weights to 64
def test_q8_linear(rows, k):
    gen = torch.Generator().manual_seed(rows * 10 + k)
    n, kp = 33, -(-k // 32) * 32
    q = torch.randint(-128, 128, (n, kp), generator=gen, dtype=torch.int8)
    q[:, k:] = 0
    d = (torch.rand(n, kp // 32, generator=gen) * 0.01).half()
    x = torch.randn(rows, k, generator=gen)
    xq, xd = quantize_activations(x)
    expected = torch.einsum("mbj,nbj,nb,mb->mn", xq, q.view(n, -1, 32).double(), d.double(), xd)
    y = ops.q8_linear(x, q, d, None)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_quantized_linear_checks_shapes():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="blocks of 32"):
        ops.q8_linear(x, torch.zeros(4, 96, dtype=torch.int8), torch.zeros(4, 3).half(), None)
    with pytest.raises(RuntimeError, match="fp16"):
        ops.q8_linear(x, torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 2), None)


@pytest.mark.parametrize("rows", [1, 9, 33])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(rows, with_residual):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 200, generator=gen)
    x = wide[:, :136]  # rows with a stride wider than the hidden size
    residual = torch.randn(rows, 136, generator=gen) if with_residual else None
    weight = torch.randn(136, generator=gen)
    out, h = ops.rms_norm(x, weight, 1e-5, residual)
    expected_h = x.double() + (residual.double() if with_residual else 0)
    torch.testing.assert_close(out.double(), rms_norm_ref(expected_h, weight.double(), 1e-5), rtol=1e-5, atol=1e-6)
    if with_residual:
        assert torch.equal(h, x + residual)  # the fp32 sum, exactly


def test_silu_and_mul_at_the_ends_of_exp():
    """The vectorized exp saturates (below -87.3: 0; above 88: exp(88)); SiLU's limits come out right anyway, in
    the 8-lane body and in the padded tail alike (11 values)."""
    gate = torch.tensor([-1000.0, -100.0, -88.5, -87.0, -20.0, 0.0, 20.0, 87.0, 88.5, 100.0, 1000.0])
    x = torch.cat([gate, torch.full_like(gate, 1.5)])[None]
    torch.testing.assert_close(ops.silu_and_mul(x).double(), silu_and_mul_ref(x.double()), rtol=1e-6, atol=1e-30)


def test_silu_and_mul():
    x = torch.randn(7, 2 * 99) * 4
    torch.testing.assert_close(ops.silu_and_mul(x).double(), silu_and_mul_ref(x.double()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads, kv_heads, d", [(4, 4, 64), (9, 3, 64), (8, 1, 16)])
def test_rotary_on_qkv_views(heads, kv_heads, d):
    """q and k as the column ranges of one fused QKV output, as Attention.forward passes them."""
    gen = torch.Generator().manual_seed(heads)
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen)
    q = qkv[:, :heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(tokens, kv_heads, d)
    positions = torch.randint(0, 300, (tokens,), generator=gen)
    angles = torch.arange(300)[:, None].double() * torch.rand(d // 2, generator=gen).double()
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    q_out, k_out = ops.rotary(q, k, positions, cache.float())
    q_ref, k_ref = rotary_ref(q.double(), k.double(), positions, cache)
    torch.testing.assert_close(q_out.double(), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_out.double(), k_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        ops.rotary(q, k, torch.full((tokens,), 300), cache.float())


def test_store_kv_skips_minus_one():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([15, 16, -1, 63, 0])  # a block boundary, a skipped token, the last slot
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(RuntimeError, match="past the cache"):
        ops.store_kv(k, v, k_cache, v_cache, torch.tensor([64, 0, 1, 2, 3]))


ATTENTION_CASES = {
    # name: num_heads, num_kv_heads, head_dim, block_size, seq_lens, alibi
    "mha-bs16-boundaries": (4, 4, 64, 16, [1, 16, 17, 50], False),
    "gqa-bs32": (9, 3, 64, 32, [32, 33, 1, 70], False),
    "mqa-alibi": (8, 1, 16, 16, [5, 40, 130], True),
    "gqa-alibi-hd128": (4, 2, 128, 16, [18, 47], True),
    "long-ragged-splits": (9, 3, 64, 16, [1000, 3, 257, 0], False),  # chunks of keys, some empty; an empty cache
    "long-alibi-splits": (4, 4, 32, 32, [700, 129], True),
    "one-short-seq-splits": (9, 3, 64, 16, [145], False),  # batch 1: chunks start mid-block to feed the threads
    # head dims off the 4-row dots' 16 and the value sums' 64/32-lane runs: 32 + 8 lanes, and 3 x 8 lanes
    "hd40": (4, 2, 40, 16, [37, 5], False),
    "hd24-alibi": (6, 3, 24, 16, [70, 16], True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_attention(case, cache_dtype, threads):
    """fp16 caches (kv_rows.h) are widened as read: the float64 reference over the same rows bounds them alike."""
    heads, kv_heads, d, block_size, seq_lens, alibi = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(len(seq_lens), heads, d, generator=gen)
    k_cache, v_cache, block_tables = make_paged_cache(seq_lens, kv_heads, d, block_size, cache_dtype, "cpu", gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    slopes = alibi_slopes(heads, "cpu") * d ** -0.5 if alibi else None
    out = ops.decode_attention(q, k_cache, v_cache, block_tables, lens, d ** -0.5, slopes)
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), block_tables, lens, d ** -0.5,
                                    None if slopes is None else slopes.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # the entry point takes the C++ kernel for both cache types (the reference would equal it only to ~1e-6)
    assert torch.equal(decode_attention(q, k_cache, v_cache, block_tables, lens, d ** -0.5, slopes), out)


def test_decode_attention_checks_the_block_table():
    k_cache, v_cache, block_tables = make_paged_cache([20], 2, 16, 16, torch.float32, "cpu")
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        ops.decode_attention(q, k_cache, v_cache, block_tables, torch.tensor([1000], dtype=torch.int32), 0.25, None)
    block_tables[0, 1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="is not in the cache"):
        ops.decode_attention(q, k_cache, v_cache, block_tables, torch.tensor([20], dtype=torch.int32), 0.25, None)


def test_entry_points_take_the_cpu_kernels(monkeypatch):
    """fp32 CPU tensors go to the C++ kernels; LLMENGINE_CPU_KERNELS=0 sends them to the torch references."""
    from llmengine_runtime.kernels import rms_norm

    x, w = torch.randn(3, 64), torch.randn(64)
    calls = []
    real = ops.rms_norm
    monkeypatch.setattr(torch.ops.llmengine_cpu, "rms_norm", lambda *a: calls.append(1) or real(*a), raising=False)
    rms_norm(x, w, 1e-5)
    assert calls == [1]
    monkeypatch.setenv("LLMENGINE_CPU_KERNELS", "0")
    rms_norm(x, w, 1e-5)
    assert calls == [1]


@pytest.mark.parametrize("vocab", [1, 7, 64, 49157])
def test_greedy_sample_is_argmax_and_its_log_prob(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen) * 4
    logits[1, :] = 0.5  # all tied: the first index
    logits[2, vocab // 2] = 30.0  # a clear winner
    if vocab > 1:
        logits[3, ::2] = float("-inf")  # masked tokens
        logits[4, [vocab - 1, 0]] = 50.0  # a tie between the last and the first: the first
    tokens, log_probs = ops.greedy_sample(logits)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    tokens_only, no_log_probs = ops.greedy_sample(logits, False)  # the argmax pass alone
    assert torch.equal(tokens_only, tokens) and no_log_probs.isnan().all()
    expected = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
    # an fp32 sum of V exps (8 lanes of V / 8 terms): relative error up to ~V / 8 * 2^-24, 4e-4 at 49k; seen 5e-6
    torch.testing.assert_close(log_probs.double(), expected, rtol=2e-5, atol=2e-5)


def test_greedy_sample_nan_and_all_masked_rows_as_torch():
    logits = torch.zeros(3, 20)
    logits[0, 7] = float("nan")
    logits[1, :] = float("-inf")
    logits[2, 3] = 1.0
    tokens, log_probs = ops.greedy_sample(logits)
    expected = logits.gather(1, logits.argmax(-1)[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    assert tokens.tolist() == logits.argmax(-1).tolist() == [7, 0, 3]
    assert log_probs[:2].isnan().all() and expected[:2].isnan().all()
    torch.testing.assert_close(log_probs[2], expected[2])
