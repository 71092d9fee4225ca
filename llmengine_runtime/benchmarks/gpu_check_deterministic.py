"""gpu_check's `--deterministic` case (kernels/deterministic.py): with the switch on, every row's numbers must be
bit-identical (`==`) however it is batched. Written without a GPU and so far run only under the Triton interpreter
(tests/kernels/test_kernel_deterministic*.py): the first `make gpu-check` on a GPU is its first real test.

Checks, each an exact comparison (a failure reports the largest difference):
- the fixed-tile product at a 7B MLP's shape (bf16, 4096 -> 11008): rows of a 256-row product against the same
  rows as 1-, 7- and 64-row products; its error against an fp32 product; its time against cuBLAS (F.linear);
- the int4 product: one row against its row in a 37-row product;
- attention: 32 decode rows over 2048 cached keys against subsets of them in shuffled order; a 1024-token prompt, in
  one piece and in chunks of 384, against its decode rows; its time against the default decode kernel;
- a random 4-layer Llama in bf16: one sequence's logits alone, beside another prompt, chunked beside a decode step,
  without a cache, and as decode steps (`sequence_logits_ways`, which the interpreter test runs on a tiny model);
- for contrast, the same model with the switch off: reported, not required (cuBLAS and the default kernels are
  expected to differ).
"""

from __future__ import annotations

import time

import torch

from llmengine_runtime.kernels.deterministic import set_deterministic
from llmengine_runtime.models.attention import AttentionMetadata, allocate_kv_caches
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import parse_config


class PagedRun:
    """Steps over a paged cache, sequence s owning blocks `s * blocks_per_seq ..`: step([(seq, tokens, start),
    ...]) computes the tokens at positions start.. of each sequence (their K/V stored) and returns each part's
    logits."""

    def __init__(self, model: CausalLM, device, dtype: torch.dtype, block_size: int = 16, blocks_per_seq: int = 8,
                 num_seqs: int = 2) -> None:
        self.model, self.device, self.block_size = model, device, block_size
        self.caches = allocate_kv_caches(model.config, num_seqs * blocks_per_seq, block_size, dtype, device)
        self.tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)

    @torch.inference_mode()
    def step(self, parts: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        ids, positions, slots, lens, cu = [], [], [], [], [0]
        size = self.block_size
        for seq, tokens, start in parts:
            span = range(start, start + len(tokens))
            ids += tokens
            positions += list(span)
            slots += [int(self.tables[seq, p // size]) * size + p % size for p in span]
            lens.append(span.stop)
            cu.append(cu[-1] + len(tokens))
        device = self.device
        meta = AttentionMetadata(torch.tensor(cu, dtype=torch.int32, device=device),
                                 torch.tensor(lens, dtype=torch.int32, device=device),
                                 torch.tensor(slots, device=device),
                                 self.tables[[seq for seq, _, _ in parts]].to(device),
                                 max_seqlen_q=max(len(t) for _, t, _ in parts),
                                 is_decode=all(len(t) == 1 for _, t, _ in parts))
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta,
                            self.caches)
        return list(self.model.compute_logits(hidden).split([len(t) for _, t, _ in parts]))


def sequence_logits_ways(model: CausalLM, a: list[int], b: list[int], device, dtype: torch.dtype, chunk: int,
                         prompt: int, **run_kwargs) -> dict[str, torch.Tensor]:
    """Sequence a's logits (one row per token) computed five ways, b the other sequence: "alone", "beside b" (one
    step), "chunked" (`chunk` tokens beside b's prompt, then the rest beside b's decode step), "no cache" (both
    packed, cache-less) and "decode steps" (`prompt` tokens, then one step per position, b decoding too while it
    has tokens left)."""
    ways = {"alone": PagedRun(model, device, dtype, **run_kwargs).step([(0, a, 0)])[0],
            "beside b": PagedRun(model, device, dtype, **run_kwargs).step([(1, b, 0), (0, a, 0)])[1]}
    run = PagedRun(model, device, dtype, **run_kwargs)
    first = run.step([(0, a[:chunk], 0), (1, b[:-1], 0)])[0]
    ways["chunked"] = torch.cat([first, run.step([(1, b[-1:], len(b) - 1), (0, a[chunk:], chunk)])[1]])
    with torch.inference_mode():
        meta = AttentionMetadata.for_prompts([len(b), len(a)], device)
        ids = torch.tensor(b + a, device=device)
        positions = torch.tensor(list(range(len(b))) + list(range(len(a))), device=device)
        ways["no cache"] = model.compute_logits(model(ids, positions, meta))[len(b):]
    run = PagedRun(model, device, dtype, **run_kwargs)
    rows = [run.step([(0, a[:prompt], 0), (1, b[:prompt], 0)])[0]]
    for p in range(prompt, len(a)):
        rows.append(run.step([(0, a[p:p + 1], p)] + ([(1, b[p:p + 1], p)] if p < len(b) else []))[0])
    ways["decode steps"] = torch.cat(rows)
    return ways


def differences(ways: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each way's largest |difference| from "alone" (0.0: bit-identical; inf: a shape or NaN mismatch)."""
    alone = ways["alone"].float()
    return {name: (float((t.float() - alone).abs().max()) if t.shape == alone.shape and not t.isnan().any()
                   else float("inf")) for name, t in ways.items() if name != "alone"}


def same_rows(full: torch.Tensor, subset: torch.Tensor) -> float:
    return float((full.float() - subset.float()).abs().max()) if full.shape == subset.shape else float("inf")


def _ms(fn, reps: int = 20) -> float:
    """Mean milliseconds of fn on the GPU (nan elsewhere: the interpreter's times mean nothing)."""
    if not torch.cuda.is_available():
        return float("nan")
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def check_products(device, dtype=torch.bfloat16, m: int = 256, k: int = 4096, n: int = 11008
                   ) -> list[tuple[str, bool, str]]:
    import torch.nn.functional as F

    from llmengine_runtime.kernels.deterministic_matmul import fixed_tile_matmul_triton
    from llmengine_runtime.kernels.quant_matmul import pack_int4, w4a16_matmul

    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    y = fixed_tile_matmul_triton(x, w)
    worst = max(same_rows(y[rows], fixed_tile_matmul_triton(x[rows], w))
                for rows in (slice(m // 2, m // 2 + 1), slice(3, 10), torch.randperm(m, device=device)[:m // 4]))
    err = float((y.float() - x.float() @ w.float().T).abs().max())
    timing = f"{_ms(lambda: fixed_tile_matmul_triton(x, w)):.3f} ms vs cuBLAS {_ms(lambda: F.linear(x, w)):.3f} ms"
    out = [(f"fixed-tile matmul rows ({m} vs 1, 7, {m // 4} rows)", worst == 0.0,
            f"max row diff {worst:.2e}; max err vs fp32 {err:.2e}; {m} x {k} -> {n}: {timing}")]
    q = torch.randint(0, 16, (n, k), device=device)
    scale = (torch.rand(k // 32, n, device=device) * 0.05 + 0.01).half()
    min_ = (-8 * scale.float()).half()
    xq = x[:37].contiguous()
    yq = w4a16_matmul(xq, pack_int4(q), scale, min_, 32)
    worst = same_rows(yq[5:6], w4a16_matmul(xq[5:6], pack_int4(q), scale, min_, 32))
    out.append(("int4 product rows (1 vs 37 rows)", worst == 0.0, f"max row diff {worst:.2e}"))
    return out


def check_attention(device, dtype=torch.bfloat16, seqs: int = 32, ctx: int = 2048, heads: int = 32,
                    kv_heads: int = 8, d: int = 128, n: int = 1024, chunk: int = 384) -> list[tuple[str, bool, str]]:
    from llmengine_runtime.kernels.decode_attention import decode_attention_triton
    from llmengine_runtime.kernels.deterministic_attention import (
        deterministic_prefill_attention,
        fixed_split_attention,
    )
    from llmengine_runtime.kernels.testing import make_paged_cache

    scale = d ** -0.5
    q = torch.randn(seqs, heads, d, dtype=dtype, device=device)
    k_cache, v_cache, tables = make_paged_cache([ctx] * seqs, kv_heads, d, 16, dtype, device)
    lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
    out = fixed_split_attention(q, k_cache, v_cache, tables, lens, scale)
    rows = torch.randperm(seqs, device=device)[:seqs // 3 + 1]
    worst = max(same_rows(out[rows], fixed_split_attention(q[rows], k_cache, v_cache, tables[rows], lens[rows],
                                                           scale)),
                same_rows(out[1:2], fixed_split_attention(q[1:2], k_cache, v_cache, tables[1:2], lens[1:2], scale)))
    timing = (f"{_ms(lambda: fixed_split_attention(q, k_cache, v_cache, tables, lens, scale)):.3f} ms vs default "
              f"{_ms(lambda: decode_attention_triton(q, k_cache, v_cache, tables, lens, scale)):.3f} ms")
    checks = [(f"decode rows ({seqs} x {ctx} keys vs shuffled subsets)", worst == 0.0,
               f"max row diff {worst:.2e}; {timing}")]
    # one sequence's prompt of n tokens: its K/V in the cache, every token a row
    k_cache, v_cache, tables = make_paged_cache([n], kv_heads, d, 16, dtype, device)
    qs = torch.randn(n, heads, d, dtype=dtype, device=device)
    decode = fixed_split_attention(qs, k_cache, v_cache, tables.expand(n, -1).contiguous(),
                                   torch.arange(1, n + 1, dtype=torch.int32, device=device), scale)
    pieces = []
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        cu = torch.tensor([0, end - start], dtype=torch.int32, device=device)
        lens = torch.tensor([end], dtype=torch.int32, device=device)
        pieces.append(deterministic_prefill_attention(qs[start:end], None, None, cu, k_cache, v_cache, tables, lens,
                                                      scale))  # (k, v: already in the cache)
    whole = deterministic_prefill_attention(qs, None, None, torch.tensor([0, n], dtype=torch.int32, device=device),
                                            k_cache, v_cache, tables, torch.tensor([n], dtype=torch.int32,
                                                                                   device=device), scale)
    worst = max(same_rows(decode, torch.cat(pieces)), same_rows(decode, whole))
    checks.append((f"prompt rows = decode rows ({n} tokens, whole and chunks of {chunk})", worst == 0.0,
                   f"max row diff {worst:.2e}"))
    return checks


MODEL = dict(architectures=["LlamaForCausalLM"], vocab_size=1000, hidden_size=512, intermediate_size=1376,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)


def check_model(device, dtype=torch.bfloat16, overrides: dict | None = None, lengths: tuple[int, int] = (300, 90),
                chunk: int = 128, prompt: int = 80) -> list[tuple[str, bool, str]]:
    config = parse_config({**MODEL, **(overrides or {})})
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in lengths)
    out = []
    for on in (True, False):
        set_deterministic(on)
        diffs = differences(sequence_logits_ways(model, a, b, device, dtype, chunk=chunk, prompt=prompt,
                                                 block_size=16, blocks_per_seq=-(-max(lengths) // 16)))
        detail = ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items())
        if on:
            name = f"model logits, --deterministic ({config.num_layers}-layer Llama, {str(dtype)[6:]})"
            out.append((name, all(v == 0.0 for v in diffs.values()), f"max diff vs alone: {detail}"))
        else:
            out.append(("model logits, default paths (contrast, not required)", True, f"max diff vs alone: {detail}"))
    return out


TINY = dict(products=dict(m=40, k=96, n=80), attention=dict(seqs=4, ctx=70, heads=4, kv_heads=2, d=32, n=40,
                                                           chunk=16),
            model=dict(overrides=dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4), lengths=(21, 9), chunk=8, prompt=5))


def check_deterministic(device: str = "cuda", sizes: dict | None = None) -> dict:
    """{"ok", "rows": [(check, ok, detail)], "detail"}: every check above (`sizes`: TINY for an interpreted run),
    the switch restored off after."""
    sizes = sizes or {}
    try:
        set_deterministic(True)
        rows = check_products(device, **sizes.get("products", {})) \
            + check_attention(device, **sizes.get("attention", {})) + check_model(device, **sizes.get("model", {}))
    finally:
        set_deterministic(False)
    lines = [f"- {'ok' if ok else 'FAIL'}: {name}: {detail}" for name, ok, detail in rows]
    return {"ok": all(ok for _, ok, _ in rows), "rows": rows,
            "detail": "--deterministic (batch invariance, exact):\n" + "\n".join(lines)}
