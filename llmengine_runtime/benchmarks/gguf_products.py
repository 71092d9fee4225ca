"""GGUF products benchmark: `llmengine_cpu::gguf_linear` at one activation row, per GGUF type, against the memory.

    python -m llmengine_runtime.benchmarks.gguf_products                     # every type, 1 and 2 threads
    python -m llmengine_runtime.benchmarks.gguf_products --types Q4_0 Q4_K --threads 2

Per type, a 2048 x 8192 and an 8192 x 2048 weight ([out, in], random valid blocks: finite fp16 scales, every other
byte random), copied until the copies hold --pool-mb (on huge pages, as a loaded model's weights:
models/huge_pages.py), so that cycling through them reads the weights from memory
rather than from the cache (this machine's last-level cache may be hundreds of MB). One product per copy in turn,
--repeats rounds; the median time per product and the weight bytes it read / that time (GB/s). Beside it, in the
same run and per thread count: the plain read bandwidth, a float32 `torch.sum` over a --pool-mb tensor on the same
kind of pages (best of 5),
and each product's GB/s as a fraction of it. A product's result is checked against the float64 one of the
dequantized weight before timing (within 2% of the output's scale: activation rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmengine_runtime.benchmarks.common import (
    OUT_DIR,
    MiB,
    append_results,
    fmt,
    machine_info,
    markdown_table,
    write_outputs,
)
from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.huge_pages import huge_page_buffer, huge_pages_available

T = gguf.GGMLQuantizationType
# type -> (elements per block, bytes per block, byte offsets of the block's fp16 scales)
BLOCKS = {
    "Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q5_0": (32, 22, [0]), "Q5_1": (32, 24, [0, 2]),
    "Q8_0": (32, 34, [0]), "Q2_K": (256, 84, [80, 82]), "Q3_K": (256, 110, [108]), "Q4_K": (256, 144, [0, 2]),
    "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208]),
}
SHAPES = [(2048, 8192), (8192, 2048)]


def random_weight(name: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes]: random bytes with finite fp16 scales (about 1e-3 .. 2e-2, either sign)."""
    elems, size, scales = BLOCKS[name]
    w = torch.randint(0, 256, (n, k // elems, size), generator=gen, dtype=torch.uint8)
    for offset in scales:
        d = (torch.rand(n, k // elems, generator=gen) + 0.05) * 0.02 * torch.randn(n, k // elems, generator=gen).sign()
        w[..., offset:offset + 2] = d.half().view(torch.uint8).view(n, k // elems, 2)
    return w.view(n, -1)


def on_pages_like_weights(t: torch.Tensor) -> torch.Tensor:
    """`t` copied where a loaded model keeps its weights: on huge pages when the kernel gives them
    (models/huge_pages.py), else as it is."""
    if not huge_pages_available():
        return t
    copy = huge_page_buffer(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    return copy.copy_(t)


def read_bandwidth(pool_mb: int, repeats: int = 5) -> float:
    """Bytes per second of `torch.sum` over a float32 tensor of pool_mb, on the pages weights get (best of
    repeats)."""
    data = on_pages_like_weights(torch.ones(pool_mb * MiB // 4))
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t0)
    return data.numel() * 4 / best


def check(name: str, w: torch.Tensor, k: int) -> float:
    """The relative error of one product against float64 with the dequantized weight (first 256 rows)."""
    x = torch.randn(1, k)
    y = torch.ops.llmengine_cpu.gguf_linear(x, w[:256], int(T[name]), k, None).double()
    wd = torch.from_numpy(gguf.quants.dequantize(w[:256].numpy(), T[name]).astype(np.float64))
    expected = x.double() @ wd.T
    rel = ((y - expected).abs().max() / expected.abs().max()).item()
    assert rel < 0.02, f"{name}: the product is off by {rel:.3g} of its scale"
    return rel


def time_type(name: str, n: int, k: int, pool_mb: int, repeats: int, gen: torch.Generator) -> list[float]:
    """Seconds per product over `repeats` rounds through the pool of copies of one random weight."""
    w = random_weight(name, n, k, gen)
    copies = [on_pages_like_weights(w) for _ in range(max(1, pool_mb * MiB // w.numel()))]
    x = torch.randn(1, k)
    op = torch.ops.llmengine_cpu.gguf_linear
    for c in copies[:4]:
        op(x, c, int(T[name]), k, None)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in copies:
            op(x, c, int(T[name]), k, None)
        times.append((time.perf_counter() - t0) / len(copies))
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    assert cpu_kernels.available(), "the C++ CPU kernels did not build"
    gen = torch.Generator().manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    errors = {name: check(name, random_weight(name, 256, 2048, gen), 2048) for name in args.types}
    rows, bandwidth = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth[threads] = read_bandwidth(args.pool_mb)
        for name in args.types:
            for n, k in SHAPES:
                times = time_type(name, n, k, args.pool_mb, args.repeats, gen)
                nbytes = n * k // BLOCKS[name][0] * BLOCKS[name][1]
                gb_s = nbytes / statistics.median(times) / 1e9
                rows.append({"type": name, "out": n, "in": k, "threads": threads, "weight_bytes": nbytes,
                             "ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "weight_gb_s": gb_s,
                             "fraction_of_read_bandwidth": gb_s * 1e9 / bandwidth[threads]})
                print(f"{name} {n}x{k} threads={threads}: {gb_s:.1f} GB/s "
                      f"({100 * gb_s * 1e9 / bandwidth[threads]:.0f}% of {bandwidth[threads] / 1e9:.1f})", flush=True)
    return {"benchmark": "gguf_products", "machine": machine_info(), "march": cpu_kernels.march(),
            "pool_mb": args.pool_mb, "repeats": args.repeats, "rows": rows, "max_rel_error_vs_float64": errors,
            "read_gb_s": {str(t): b / 1e9 for t, b in bandwidth.items()},
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def markdown(report: dict[str, Any]) -> str:
    """One row per type: per shape and thread count, weight GB/s (% of the read bandwidth of that thread count)."""
    cases = sorted({(r["out"], r["in"], r["threads"]) for r in report["rows"]}, key=lambda c: (c[2], c[0]))
    by = {(r["type"], r["out"], r["in"], r["threads"]): r for r in report["rows"]}
    before, after = report["load_average_1min"]
    reads = ", ".join(f"{t} thread(s) {float(b):.1f} GB/s" for t, b in report["read_gb_s"].items())
    lines = [f"gguf_linear, 1 activation row (-march={report['march']}): weight GB/s (% of the read bandwidth: "
             f"{reads}; float32 sum over {report['pool_mb']} MB). Weights cycled through {report['pool_mb']} MB of "
             f"copies, median of {report['repeats']} rounds. 1-minute load average {before:.1f} before, {after:.1f} "
             f"after ({report['machine']['cores']} cores): on a busy machine each 2-thread product also waits for "
             "both threads to be scheduled.", ""]
    table = []
    for name in dict.fromkeys(r["type"] for r in report["rows"]):
        cells = []
        for n, k, t in cases:
            r = by[(name, n, k, t)]
            cells.append(f"{fmt(r['weight_gb_s'])} ({100 * r['fraction_of_read_bandwidth']:.0f}%)")
        table.append([name, *cells])
    lines.append(markdown_table(["type", *(f"{n}x{k}, {t} thr" for n, k, t in cases)], table))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.gguf_products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--pool-mb", type=int, default=1024, help="weight copies cycled through, and the read test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="gguf_products")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    report = run(args)
    text = markdown(report)
    paths = write_outputs(Path(args.out_dir), args.name, report, text)
    print(text)
    if args.append_results:
        print(f"appended to {append_results('gguf products', text, report['machine'])}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
