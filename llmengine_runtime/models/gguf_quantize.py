"""Float weights -> GGUF block bytes, as llama.cpp's reference quantizers write them (`quantize_row_*_ref`).

    raw = quantize_rows(w, "Q4_K")      # w [N, K] float -> uint8 [N, K / 256 * 144]

llama-quantize without an importance matrix takes exactly these paths (ggml-quants.c: `quantize_q4_K(...,
quant_weights=NULL)` calls `quantize_row_q4_K_ref`, and so on for every type here; Q8_0 always does), so the bytes
here are meant to equal `llama_model_quantize`'s on the same F32 tensor, byte for byte (tests/models/
test_gguf_quantize_golden.py holds them against a file llama.cpp wrote). Reproducing them means doing the same
float32 operations in the same order: every product and sum is rounded to float32 as ggml-base's plain C does
(it is built without -march, so no fused multiply-adds), and the sums over a block run element by element
(`sequential_sum`). The work is vectorized across blocks: a tensor of blocks is held element-major, `[n, B]`, so
`x[i]` is element i of all B blocks.

This file: the entry point; the float32 helpers and the 32-weight types are in gguf_quantize_blocks.py, the
256-weight k-quants (Q2_K..Q6_K) and their scale searches in gguf_quantize_k.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from llmengine_runtime.models import gguf_quantize_k as k
from llmengine_runtime.models.gguf_quantize_blocks import (
    qtype_of,
    quantize_q4_0,
    quantize_q4_1,
    quantize_q5_0,
    quantize_q5_1,
    quantize_q8_0,
)


def _block_quantizers() -> dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]]:
    T = GGMLQuantizationType
    return {T.Q8_0: quantize_q8_0, T.Q4_0: quantize_q4_0, T.Q4_1: quantize_q4_1, T.Q5_0: quantize_q5_0,
            T.Q5_1: quantize_q5_1, T.Q2_K: k.quantize_q2_k, T.Q3_K: k.quantize_q3_k, T.Q4_K: k.quantize_q4_k,
            T.Q5_K: k.quantize_q5_k, T.Q6_K: k.quantize_q6_k}


QUANTIZABLE_TYPES = tuple(GGMLQuantizationType[name] for name in
                          ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
CHUNK_WEIGHTS = 1 << 17  # weights per vectorized step: its [n, B] temporaries stay in cache


def row_bytes(qtype: GGMLQuantizationType | str, k: int) -> int:
    """Bytes of one row of k weights in this type."""
    block, size = GGML_QUANT_SIZES[qtype_of(qtype)]
    if k % block:
        raise ValueError(f"{qtype_of(qtype).name} needs rows that are a multiple of {block} weights, not {k}")
    return k // block * size


def quantize_rows(weight: torch.Tensor, qtype: GGMLQuantizationType | str, progress: bool = False,
                  desc: str | None = None) -> torch.Tensor:
    """`[N, K]` float weights -> `[N, row_bytes(qtype, K)]` uint8, the GGUF bytes of each row in `qtype`
    (F32 and F16 too: their plain little-endian values). The weights are rounded to float32 first."""
    qtype = qtype_of(qtype)
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if w.dim() != 2:
        raise ValueError(f"quantize_rows takes a matrix [N, K], not shape {tuple(w.shape)}")
    n, k = w.shape
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = torch.float32 if qtype == GGMLQuantizationType.F32 else torch.float16
        return w.to(dtype).view(torch.uint8).reshape(n, -1)
    quantizers = _block_quantizers()
    if qtype not in quantizers:
        raise ValueError(f"no quantizer for {qtype.name}; supported: {', '.join(t.name for t in quantizers)}")
    block, size = GGML_QUANT_SIZES[qtype]
    out = torch.empty(n, row_bytes(qtype, k), dtype=torch.uint8)
    blocks, out_blocks = w.view(-1, block), out.view(-1, size)
    step = max(1, CHUNK_WEIGHTS // block)
    starts = range(0, blocks.shape[0], step)

    def run(start: int) -> None:  # [block, B]: element-major
        out_blocks[start:start + step] = quantizers[qtype](blocks[start:start + step].t().contiguous())

    with single_threaded_ops(), ThreadPoolExecutor(max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        for _ in tqdm(pool.map(run, starts), total=len(starts), desc=desc or f"quantizing to {qtype.name}",
                      unit="chunk", disable=not progress or len(starts) < 4, leave=False):
            pass
    return out


@contextmanager
def single_threaded_ops():
    """torch ops on one thread each while quantizing: the chunks run in parallel instead. The ops are small (a
    few hundred kB), and OpenMP's per-op barriers cost more than they save; on a busy machine, 10-20x more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
