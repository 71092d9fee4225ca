"""Matrix-product benchmark: one forward's projection products, by weight layout, against the row count.

    python -m llmengine_runtime.benchmarks.products                          # default model's shapes, fp32, 1..128 rows
    python -m llmengine_runtime.benchmarks.products --dtype bfloat16 --rows 1 4 17

Every projection matrix of the model's layers (fused QKV, o, fused gate/up, down: each layer its own
weights, so nothing stays in cache between products, as in a real step), multiplied by an `[rows, in]`
input the way a decode step (1 row per sequence) or a prompt (1 row per token) does. Per method and row
count: the median time of all the products (ms) and the weight bytes read / that time (GB/s).

Methods: `F.linear` with the checkpoint's row-major weight; `F.linear` with a column-major copy;
oneDNN's packed weight (`mkldnn._reorder_linear_weight` for 1 row and for 16 rows, then
`_linear_pointwise`), which is what models/packed_linear.py runs on CPU; with fp32 and our C++ kernels, the
weights quantized to int4 and int8 in blocks of 32 (eight rows interleaved, as the default model's GGUF layers run)
on the vector path (vpdpbusd) and, where the CPU has AMX, on AMX tiles (kernels/cpu/amx_interleaved.cpp; the same
bits). Each method's products are checked against float64 first (the quantized ones against their dequantized
weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, machine_info
from llmengine_runtime.benchmarks.report import products_markdown, products_plot, publish
from llmengine_runtime.models.loader import parse_dtype
from llmengine_runtime.models.packed_linear import can_pack, packed_product, reorder

Product = Callable[[torch.Tensor], torch.Tensor]


def projection_shapes(model: str, num_layers: int | None) -> list[tuple[int, int]]:
    """`(out, in)` of every projection matrix of the model's layers, in the order a step runs them."""
    from llmengine_runtime.models.config import load_config, parse_config
    from llmengine_runtime.models.zoo import ZOO, resolve_model

    config = parse_config(ZOO[model].config) if model in ZOO else load_config(resolve_model(model))
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    gated = config.arch != "falcon"
    layer = [(q + 2 * kv, h), (h, q), ((2 if gated else 1) * config.intermediate_size, h),
             (h, config.intermediate_size)]
    return layer * (num_layers or config.num_layers)


def methods(weights: list[torch.Tensor]) -> dict[str, list[Product]]:
    def dense(w: torch.Tensor) -> Product:
        return lambda x: F.linear(x, w)

    def packed(w: torch.Tensor, rows: int) -> Product:
        p = reorder(w, rows)
        return lambda x: packed_product(x, p)

    found = {"F.linear row-major": [dense(w) for w in weights],
             "F.linear column-major": [dense(w.t().contiguous().t()) for w in weights]}
    if can_pack(weights[0].dtype):
        found["oneDNN packed for 1 row"] = [packed(w, 1) for w in weights]
        found["oneDNN packed for 16 rows"] = [packed(w, 16) for w in weights]
    return found


def quantized_methods(weights: list[torch.Tensor]) -> tuple[dict[str, list[Product]], dict[str, list[torch.Tensor]]]:
    """The int4 and int8 interleaved products, on the vector path and on AMX tiles where there are some, and the
    dequantized weights each is checked against."""
    from llmengine_runtime.kernels import cpu as cpu_kernels
    from llmengine_runtime.models.quantized_linear import QuantizedLinear

    if weights[0].dtype != torch.float32 or not cpu_kernels.available():
        return {}, {}
    ops = torch.ops.llmengine_cpu
    before = ops.amx_enabled()
    paths = {"vpdpbusd": False, "AMX tiles": True} if ops.set_amx(True) else {"vpdpbusd": False}
    ops.set_amx(before)

    def on(layer: QuantizedLinear, amx: bool) -> Product:
        return lambda x: (ops.set_amx(amx), layer(x))[1]

    found, refs = {}, {}
    for mode in ("int4", "int8"):
        layers = [QuantizedLinear.quantize(w, mode=mode, group_size=32) for w in weights]
        for path, amx in paths.items():
            found[f"{mode} interleaved, {path}"] = [on(layer, amx) for layer in layers]
            refs[f"{mode} interleaved, {path}"] = [layer.dequantize().float() for layer in layers[:4]]
    return found, refs


def check(name: str, products: list[Product], weights: list[torch.Tensor], dtype: torch.dtype,
          quantized: bool = False) -> float:
    """Largest error against float64 over a few matrices and row counts, relative to the output's scale."""
    worst = 0.0
    for i in (0, 1, 2, 3):
        for rows in (1, 5, 17):
            x = torch.randn(rows, weights[i].shape[1]).to(dtype)
            ref = x.double() @ weights[i].double().t()
            err = (products[i](x).double() - ref).abs().max().item() / ref.abs().max().item()
            worst = max(worst, err)
    bound = 1e-5 if dtype == torch.float32 and not quantized else 2e-2  # (quantized: the int8 activations)
    if worst > bound:
        raise AssertionError(f"{name}: relative error {worst:.2e} against float64 exceeds {bound:.0e}")
    return worst


def time_products(products: list[Product], inputs: list[torch.Tensor], repeats: int) -> list[float]:
    for p, x in zip(products, inputs):  # warm-up
        p(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p, x in zip(products, inputs):
            p(x)
        times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = parse_dtype(args.dtype)
    shapes = projection_shapes(args.model, args.num_layers)
    weights = [(torch.randn(o, i) * i**-0.5).to(dtype) for o, i in shapes]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    found = methods(weights)
    errors = {name: check(name, products, weights, dtype) for name, products in found.items()}
    quantized, refs = quantized_methods(weights)
    errors |= {name: check(name, products, refs[name], dtype, quantized=True) for name, products in quantized.items()}
    found |= quantized
    numel = sum(w.numel() for w in weights)
    stored = {"int4": numel // 2 + numel // 8, "int8": numel + numel // 16}  # + fp16 scale (and min) per 32
    bytes_of = {name: stored.get(name.split()[0], weight_bytes) for name in found}
    rows = []
    bar = tqdm(total=len(found) * len(args.rows), desc="products", unit="case", disable=args.no_progress)
    for n in args.rows:
        inputs = [torch.randn(n, w.shape[1]).to(dtype) for w in weights]
        for name, products in found.items():
            times = time_products(products, inputs, args.repeats)
            ms = statistics.median(times) * 1e3
            rows.append({"method": name, "rows": n, "ms": ms, "min_ms": min(times) * 1e3,
                         "max_ms": max(times) * 1e3, "weight_gb_s": bytes_of[name] / ms / 1e6})
            bar.update(1)
    bar.close()
    report = {"benchmark": "products", "machine": machine_info(), "model": args.model, "dtype": args.dtype,
              "matrices": len(shapes), "weight_bytes": weight_bytes, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "max_rel_error_vs_float64": errors, "rows": rows}
    publish(report, products_markdown(report), products_plot, args, f"products: {args.model} {args.dtype}")
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or model folder: its shapes only")
    parser.add_argument("--num-layers", type=int, default=None, help="only this many layers' matrices")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 17, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="products", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
