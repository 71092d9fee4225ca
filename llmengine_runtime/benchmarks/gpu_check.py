"""GPU check: every Triton kernel against its torch reference at realistic shapes, and how fast it is.

Run on a machine with a CUDA GPU: `make gpu-check` (`python -m llmengine_runtime.benchmarks.gpu_check`). Each check runs
a kernel through its entry point (CUDA tensors take the Triton path), compares it with the reference,
and times it with `triton.testing.do_bench` (median; L2 flushed before each run). Bandwidth is the
least number of bytes the kernel must move divided by its time, shown next to a device-to-device copy
measured in the same run (bytes read + written). Prefill attention is also timed against torch's
`scaled_dot_product_attention`. With two GPUs, tensor parallelism over NCCL is checked too
(benchmarks/gpu_check_tp.py: 2 ranks give 1 rank's greedy tokens), and `--deterministic`'s batch invariance
(benchmarks/gpu_check_deterministic.py: rows bit-identical however batched). The table is printed and appended to
benchmarks/RESULTS.md with the GPU's name. Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from llmengine_runtime.benchmarks.common import (
    OUT_DIR,
    RESULTS_MD,
    append_results,
    copy_bandwidth,
    machine_info,
    markdown_table,
    write_outputs,
)
from llmengine_runtime.benchmarks.gpu_check_deterministic import check_deterministic
from llmengine_runtime.benchmarks.gpu_check_tp import check_tensor_parallel
from llmengine_runtime.kernels.testing import make_paged_cache
from llmengine_runtime.models.layers import alibi_slopes

TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4}  # atol = rtol vs an fp32 reference
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: torch.dtype
    max_err: float
    ok: bool
    ms: float
    bytes_moved: float | None = None  # None: compute-bound, reported as TFLOP/s in `note`
    note: str = ""


def bench(fn) -> float:
    """Median milliseconds of `fn` on the GPU."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    out, ref = out.float(), ref.float()
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    ok = out.shape == ref.shape and not out.isnan().any().item() and torch.allclose(
        out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    return err, ok


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the checks ---------------------------------------------------------------------------------------
def check_store_kv(device, dtype, num_tokens=8192, num_kv_heads=32, head_dim=128, block_size=16) -> Row:
    from llmengine_runtime.kernels import store_kv
    from llmengine_runtime.kernels.store_kv import store_kv_ref

    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    k_cache, v_cache, block_tables = make_paged_cache([num_tokens], num_kv_heads, head_dim, block_size, dtype, device)
    pos = torch.arange(num_tokens, device=device)
    slot_mapping = block_tables[0, pos // block_size].long() * block_size + pos % block_size
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    store_kv_ref(k, v, k_ref, v_ref, slot_mapping)
    err, ok = compare(torch.cat([k_cache, v_cache]), torch.cat([k_ref, v_ref]), dtype)
    ms = bench(lambda: store_kv(k, v, k_cache, v_cache, slot_mapping))
    return Row("store_kv", f"{num_tokens} tok x {num_kv_heads}x{head_dim}", dtype, err, ok and err == 0.0, ms,
               2 * nbytes(k, v) + nbytes(slot_mapping))


def check_rms_norm(device, dtype, residual: bool, num_tokens=8192, hidden=4096) -> Row:
    from llmengine_runtime.kernels import rms_norm
    from llmengine_runtime.kernels.norms import rms_norm_ref

    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    r = torch.randn_like(x) if residual else None
    if residual:
        out, h = rms_norm(x, weight, 1e-6, r)
        h_ref = x + r
        err, ok = compare(torch.cat([out, h]), torch.cat([rms_norm_ref(h_ref.float(), weight.float(), 1e-6), h_ref]),
                          dtype)
        moved = nbytes(x, r, weight) + 2 * nbytes(x)
    else:
        out = rms_norm(x, weight, 1e-6)
        err, ok = compare(out, rms_norm_ref(x.float(), weight.float(), 1e-6), dtype)
        moved = 2 * nbytes(x) + nbytes(weight)
    ms = bench(lambda: rms_norm(x, weight, 1e-6, r))
    name = "rms_norm + residual" if residual else "rms_norm"
    return Row(name, f"{num_tokens} x {hidden}", dtype, err, ok, ms, moved)


def check_layer_norm(device, dtype, num_tokens=8192, hidden=4544) -> Row:
    from llmengine_runtime.kernels import layer_norm
    from llmengine_runtime.kernels.norms import layer_norm_ref

    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device) + 1.0
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    bias = (0.1 * torch.randn(hidden, device=device)).to(dtype)
    err, ok = compare(layer_norm(x, weight, bias, 1e-5),
                      layer_norm_ref(x.float(), weight.float(), bias.float(), 1e-5), dtype)
    ms = bench(lambda: layer_norm(x, weight, bias, 1e-5))
    return Row("layer_norm", f"{num_tokens} x {hidden}", dtype, err, ok, ms, 2 * nbytes(x) + nbytes(weight, bias))


def check_rotary(device, dtype, num_tokens=8192, num_heads=32, num_kv_heads=32, head_dim=128) -> Row:
    from llmengine_runtime.kernels import rotary
    from llmengine_runtime.kernels.rotary import rotary_ref

    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(4096, device=device).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    q_out, k_out = rotary(q, k, positions, cos_sin)
    q_ref, k_ref = rotary_ref(q.float(), k.float(), positions, cos_sin)
    err, ok = compare(torch.cat([q_out.flatten(), k_out.flatten()]), torch.cat([q_ref.flatten(), k_ref.flatten()]),
                      dtype)
    ms = bench(lambda: rotary(q, k, positions, cos_sin))
    moved = 2 * nbytes(q, k) + nbytes(positions) + num_tokens * head_dim * 4
    return Row("rotary", f"{num_tokens} tok, q {num_heads}x{head_dim}, k {num_kv_heads}x{head_dim}", dtype,
               err, ok, ms, moved)


def check_decode(device, dtype, name, num_seqs, seq_lens, num_heads, num_kv_heads, head_dim, block_size=16,
                 alibi=False, ref_seqs=4) -> Row:
    from llmengine_runtime.kernels import decode_attention
    from llmengine_runtime.kernels.decode_attention import decode_attention_ref

    q = torch.randn(num_seqs, num_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache, block_tables = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    slopes = alibi_slopes(num_heads).to(device) if alibi else None
    scale = head_dim ** -0.5
    out = decode_attention(q, k_cache, v_cache, block_tables, lens, scale, slopes)
    # the reference (which gathers whole caches) on the first few sequences only
    ref = decode_attention_ref(q[:ref_seqs].float(), k_cache.float(), v_cache.float(), block_tables[:ref_seqs],
                               lens[:ref_seqs], scale, slopes)
    err, ok = compare(out[:ref_seqs], ref, dtype)
    ms = bench(lambda: decode_attention(q, k_cache, v_cache, block_tables, lens, scale, slopes))
    kv_bytes = 2 * sum(seq_lens) * num_kv_heads * head_dim * k_cache.element_size()
    lengths = f"ctx {seq_lens[0]}" if len(set(seq_lens)) == 1 else f"ctx {min(seq_lens)}..{max(seq_lens)}"
    shape = f"{num_seqs} seqs x {lengths}, {num_heads}/{num_kv_heads} heads x {head_dim}"
    return Row(f"decode_attention ({name})", shape, dtype, err, ok, ms,
               kv_bytes + 2 * nbytes(q) + nbytes(block_tables, lens))


def check_prefill_vs_sdpa(device, dtype, num_seqs=4, seq_len=2048, num_heads=32, head_dim=128) -> list[Row]:
    """Causal prefill without a cached prefix, against torch SDPA on the same (equal-length) batch."""
    import torch.nn.functional as F

    from llmengine_runtime.kernels import prefill_attention

    num_tokens = num_seqs * seq_len
    q, k, v = (torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device) for _ in range(3))
    cu = torch.arange(0, num_tokens + 1, seq_len, dtype=torch.int32, device=device)
    lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    run = lambda: prefill_attention(q, k, v, cu, None, None, None, lens, scale, max_seqlen_q=seq_len)
    batched = lambda t: t.view(num_seqs, seq_len, num_heads, head_dim).transpose(1, 2)
    sdpa = lambda: F.scaled_dot_product_attention(batched(q), batched(k), batched(v), is_causal=True, scale=scale)
    ref = sdpa().transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
    err, ok = compare(run(), ref, dtype)
    ms, sdpa_ms = bench(run), bench(sdpa)
    flops = 2 * num_seqs * num_heads * seq_len * seq_len * head_dim  # causal: half of 2 matmuls x 2 flop
    shape = f"{num_seqs} x {seq_len} tok, {num_heads} heads x {head_dim}"
    return [
        Row("prefill_attention (causal, no prefix)", shape, dtype, err, ok, ms, None,
            f"{flops / ms / 1e9:.0f} TFLOP/s; {sdpa_ms / ms:.2f}x SDPA speed"),
        Row("torch SDPA (is_causal, same batch)", shape, dtype, 0.0, True, sdpa_ms, None,
            f"{flops / sdpa_ms / 1e9:.0f} TFLOP/s"),
    ]


def check_prefill_with_prefix(device, dtype, name, num_seqs, cached, new, num_heads, num_kv_heads, head_dim,
                              block_size=16, alibi=False) -> Row:
    """Chunked prefill: `new` tokens per sequence attending to `cached` earlier tokens in the paged cache."""
    from llmengine_runtime.kernels import prefill_attention
    from llmengine_runtime.kernels.prefill_attention import prefill_attention_ref

    num_tokens = num_seqs * new
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    k_cache, v_cache, block_tables = make_paged_cache([cached + new] * num_seqs, num_kv_heads, head_dim, block_size,
                                                 dtype, device)
    cu = torch.arange(0, num_tokens + 1, new, dtype=torch.int32, device=device)
    lens = torch.full((num_seqs,), cached + new, dtype=torch.int32, device=device)
    slopes = alibi_slopes(num_heads).to(device) if alibi else None
    scale = head_dim ** -0.5
    args = (q, k, v, cu, k_cache if cached else None, v_cache if cached else None,
            block_tables if cached else None, lens, scale, slopes)
    f32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    err, ok = compare(prefill_attention(*args, max_seqlen_q=new), prefill_attention_ref(*map(f32, args)), dtype)
    ms = bench(lambda: prefill_attention(*args, max_seqlen_q=new))
    keys = num_seqs * (cached * new + new * (new + 1) / 2)  # query-key pairs computed
    flops = 4 * keys * num_heads * head_dim
    shape = f"{num_seqs} seqs x ({cached} cached + {new} new), {num_heads}/{num_kv_heads} heads x {head_dim}"
    return Row(f"prefill_attention ({name})", shape, dtype, err, ok, ms, None, f"{flops / ms / 1e9:.0f} TFLOP/s")


def run_checks(device) -> list[Row]:
    bf16 = torch.bfloat16
    rows = [
        check_store_kv(device, bf16),
        check_rms_norm(device, bf16, residual=False),
        check_rms_norm(device, bf16, residual=True),
        check_layer_norm(device, bf16),
        check_rotary(device, bf16),
        check_rotary(device, torch.float32, num_heads=71, num_kv_heads=1, head_dim=64),
        check_decode(device, bf16, "llama-7b", 32, [2048] * 32, 32, 32, 128),
        check_decode(device, torch.float16, "llama-7b", 32, [2048] * 32, 32, 32, 128),
        check_decode(device, torch.float32, "llama-7b, fp32", 8, [2048] * 8, 32, 32, 128),
        check_decode(device, bf16, "GQA 32/8, ragged", 64,
                     torch.randint(1, 4097, (64,)).tolist(), 32, 8, 128, block_size=32),
        check_decode(device, bf16, "falcon-7b MQA", 32, [2048] * 32, 71, 1, 64),
        check_decode(device, bf16, "falcon-rw-1b ALiBi", 32, [1024] * 32, 32, 32, 64, alibi=True),
        check_decode(device, bf16, "batch 1, long", 1, [16384], 32, 8, 128, ref_seqs=1),
    ]
    rows += check_prefill_vs_sdpa(device, bf16)
    rows += [
        check_prefill_with_prefix(device, bf16, "chunked, GQA", 4, 1536, 512, 32, 8, 128),
        check_prefill_with_prefix(device, bf16, "falcon-rw-1b ALiBi", 4, 0, 1024, 32, 32, 64, alibi=True),
        check_prefill_with_prefix(device, bf16, "falcon-7b MQA, prefix", 2, 1000, 777, 71, 1, 64, block_size=32),
        check_prefill_with_prefix(device, torch.float16, "hd 80", 2, 300, 700, 32, 32, 80),
        check_prefill_with_prefix(device, torch.float32, "fp32, hd 96", 2, 256, 512, 16, 4, 96),
    ]
    return rows


def table(rows: list[Row], copy: float) -> str:
    body = []
    for r in rows:
        gbps = r.bytes_moved / r.ms / 1e6 if r.bytes_moved is not None else None
        time = f"{r.ms * 1e3:.1f} us" if r.ms < 1 else f"{r.ms:.3f} ms"
        body.append([r.kernel, r.shape, DTYPE_NAME[r.dtype], f"{r.max_err:.2e}", "yes" if r.ok else "FAIL", time,
                     "-" if gbps is None else f"{gbps:.0f}", "-" if gbps is None else f"{100 * gbps / copy:.0f}%",
                     r.note])
    return markdown_table(["kernel", "shape", "dtype", "max abs err", "ok", "median time", "GB/s", "% of copy",
                           "note"], body)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device found; this check needs an NVIDIA GPU (run it on a GPU machine).",
              file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full precision
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    copy = copy_bandwidth(device, mib=1024) / 1e9
    rows = run_checks(device)
    exact = check_deterministic()  # --deterministic: rows bit-identical however batched (gpu_check_deterministic.py)
    info = machine_info()
    markdown = (f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}. "
                f"Device-to-device copy: {copy:.0f} GB/s (bytes read + written). Times: median of "
                f"triton.testing.do_bench, L2 flushed. GB/s: least bytes the kernel must move / time. "
                f"Errors: max |triton - reference| (reference in fp32; SDPA for the no-prefix prefill).\n\n"
                f"{table(rows, copy)}\n\n{exact['detail']}")
    print(markdown)
    write_outputs(OUT_DIR, "gpu_check", {"machine": info, "copy_gbps": copy, "rows": [vars(r) | {
        "dtype": DTYPE_NAME[r.dtype]} for r in rows]}, markdown)
    append_results(f"gpu_check: {info.get('gpu')}", markdown, info)
    failed = [r.kernel for r in rows if not r.ok] + ([] if exact["ok"] else ["--deterministic"])
    tp = check_tensor_parallel()  # needs 2 GPUs; says "skipped" otherwise
    print(tp["detail"])
    if not tp["ok"]:
        failed.append("tensor parallelism")
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gpu_check: all {len(rows)} checks passed; results in {OUT_DIR} and appended to {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
