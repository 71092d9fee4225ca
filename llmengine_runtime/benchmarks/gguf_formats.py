"""Ours against llama.cpp on the GGUFs llama.cpp itself quantizes, every file in the same run.

    python -m llmengine_runtime.benchmarks.gguf_formats                        # smollm2-135m, 5 types
    python -m llmengine_runtime.benchmarks.gguf_formats --shape llama-3.2-1b smollm2-135m --types Q4_0 Q4_K_M

Files (benchmarks/gguf_formats_files.py, cached under ~/.cache/llmengine/gguf_formats): a random-weight llama GGUF
of the named shape written with gguf-py in F16, quantized by llama-cpp-python's `llama_model_quantize` to each
type (file types: Q4_0 and Q6_K give the table Q6_K, Q4_K_M mixes Q4_K/Q6_K, and so on, as llama-quantize does).

On each file, each engine, after a warm-up, median of --repeats:
- b1: one prompt of 16 token ids, --max-new-tokens greedy tokens: decode tok/s (tokens after the first / time);
- b8: 8 such prompts in one batch: decode tok/s of all 8 (llama.cpp through its batch API:
  benchmarks/gguf_formats_llamacpp.py; ours: the engine, benchmarks/decode_runners.py `run_ours`);
- pp512: one prompt of 512 token ids and 1 token: prompt tok/s = 512 / time to the first token;
- GB/s: the weight bytes one decode step reads (the file's tensors, less an untied table) / the b1 time per token,
  and that as a share of the read bandwidth measured in the same run (float32 `torch.sum` over 1 GiB on huge pages,
  as our weights are: models/huge_pages.py; best of 5,
  the same thread count).
Ours serves the file as it is (quantize "gguf": each tensor of the file's own type, models/gguf_model.py), with an
fp16 KV cache as llama.cpp's default and no prefix caching (each repeat computes its prompt, as llama.cpp's
does). Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from llmengine_runtime.benchmarks.common import OUT_DIR, fmt, machine_info, markdown_table
from llmengine_runtime.benchmarks.gguf_formats_files import CACHE, SHAPES, llama_quantize, random_gguf
from llmengine_runtime.benchmarks.gguf_formats_llamacpp import extra_buffer_types
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure

TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
ENGINES = ("ours", "llama.cpp")


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 49152), (n, length), generator=g).tolist()


def timed(runner, prompt_ids: list[list[int]], tokens: int, repeats: int) -> list:
    runner(prompt_ids, min(tokens, 4))  # warm-up
    return [runner(prompt_ids, tokens) for _ in range(repeats)]


def measure(runner, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """b1 / b8 decode and pp512 of one engine on one file; runner(prompts, max_new_tokens) -> decode_runners.Run."""
    out: dict[str, Any] = {}
    for label, batch in (("b1", 1), ("b8", 8)):
        runs = timed(runner, prompts(batch, 16, vocab, batch), args.max_new_tokens, args.repeats)
        out[f"{label}_tok_s"] = statistics.median(r.decode_tokens / r.decode_time for r in runs)
        out[f"{label}_tpot_ms"] = statistics.median(1e3 * r.decode_time / r.decode_steps for r in runs)
        if batch == 1:
            out["b1_tokens"] = runs[0].token_ids[0]
    runs = timed(runner, prompts(1, 512, vocab, 512), 1, args.repeats)
    out["pp512_tok_s"] = statistics.median(512 / r.ttft for r in runs)
    return out


def ours_runner(gguf: Path, threads: int):
    from llmengine_runtime.benchmarks.decode_runners import run_ours
    from llmengine_runtime.models.gguf_model import gguf_model_folder
    from llmengine_runtime.runtime import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(gguf_model_folder(gguf, CACHE / "folders"), dtype="float32", device="cpu", quantize="gguf",
              kv_cache_dtype="float16", kv_cache_gib=0.5, enable_prefix_caching=False)  # repeats recompute

    def run(prompt_ids: list[list[int]], tokens: int):
        params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
        return run_ours(llm, prompt_ids, params, torch.device("cpu"))

    return run, llm.engine.model.quantization, lambda: None


def llamacpp_runner(gguf: Path, threads: int):
    from llmengine_runtime.benchmarks.gguf_formats_llamacpp import LlamaCppBatch

    llm = LlamaCppBatch(gguf, threads)
    return llm.generate, "llama.cpp", llm.close


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llmengine_runtime.benchmarks.gguf_products import read_bandwidth
    from llmengine_runtime.benchmarks.llamacpp import gguf_weight_bytes

    shape = SHAPES[args.shape]
    torch.set_num_threads(args.threads)
    source = random_gguf(args.shape, args.seed)
    files = {t: llama_quantize(source, source.with_name(f"{args.shape}.{t}.gguf"), t, args.threads)
             for t in args.types}
    bandwidth = read_bandwidth(1024)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads)", file=sys.stderr)
    rows = []
    for qtype, gguf in files.items():
        weight_bytes, types = gguf_weight_bytes(gguf)
        results = {}
        for engine in args.engines:
            runner, weights, close = (ours_runner if engine == "ours" else llamacpp_runner)(gguf, args.threads)
            result = measure(runner, args, shape.vocab)
            close()
            runner = None
            gb_s = weight_bytes / (result["b1_tpot_ms"] / 1e3) / 1e9
            result |= {"engine": engine, "type": qtype, "weights": weights, "file_types": types,
                       "weight_mb": weight_bytes / 1e6, "b1_gb_s": gb_s, "b1_read_fraction": gb_s * 1e9 / bandwidth}
            results[engine] = result
            print(f"{qtype} {engine}: b1 {result['b1_tok_s']:.1f} tok/s ({gb_s:.1f} GB/s, "
                  f"{100 * result['b1_read_fraction']:.0f}% of read), b8 {result['b8_tok_s']:.1f}, "
                  f"pp512 {result['pp512_tok_s']:.0f}", file=sys.stderr, flush=True)
        if len(results) == 2:
            ours, theirs = results["ours"], results["llama.cpp"]
            same = next((i for i, (a, b) in enumerate(zip(ours["b1_tokens"], theirs["b1_tokens"])) if a != b),
                        len(ours["b1_tokens"]))
            for key in ("b1", "b8", "pp512"):
                ours[f"{key}_vs_llamacpp"] = ours[f"{key}_tok_s"] / theirs[f"{key}_tok_s"]
            ours["greedy_same_as_llamacpp"] = same
        rows += list(results.values())
    return {"benchmark": "gguf_formats", "machine": machine_info(), "shape": args.shape, "shape_config": vars(shape),
            "threads": args.threads, "read_gb_s": bandwidth / 1e9, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "source": str(source), "rows": rows,
            "llamacpp_extra_bufts": extra_buffer_types()}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"GGUF formats, random weights at the {report['shape']} shape, quantized by llama.cpp; "
             f"{report['threads']} threads, read bandwidth {report['read_gb_s']:.1f} GB/s; decode of "
             f"{report['max_new_tokens']} tokens after 16-token prompts, median of {report['repeats']}. Shared, busy "
             "machine: timings are noisy; compare within the run."
             + ("" if report.get("llamacpp_extra_bufts", True) else
                " llama.cpp ran without its extra buffer types (its AMX kernels fault on this VM; no weight repacks "
                "either), so its numbers are a lower bound."), ""]
    header = ["type", "engine", "weights MB/token", "b1 tok/s", "b1 GB/s (% of read)", "b8 tok/s", "pp512 tok/s",
              "ours / llama.cpp (b1, b8, pp512)", "greedy tokens equal"]
    table = []
    for r in report["rows"]:
        ratio = "-" if "b1_vs_llamacpp" not in r else \
            f"{r['b1_vs_llamacpp']:.2f}x, {r['b8_vs_llamacpp']:.2f}x, {r['pp512_vs_llamacpp']:.2f}x"
        table.append([r["type"], r["engine"], fmt(r["weight_mb"]), fmt(r["b1_tok_s"]),
                      f"{fmt(r['b1_gb_s'])} ({100 * r['b1_read_fraction']:.0f}%)", fmt(r["b8_tok_s"]),
                      fmt(r["pp512_tok_s"], 0), ratio,
                      str(r.get("greedy_same_as_llamacpp", "-")) + ("" if "greedy_same_as_llamacpp" not in r else
                                                                     f"/{report['max_new_tokens']}")])
    lines.append(markdown_table(header, table))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Bars per type and engine: b1, b8 and pp512 tok/s (one panel each)."""
    plt, fig, axes = new_figure(3, (14, 4))
    types = list(dict.fromkeys(r["type"] for r in report["rows"]))
    for ax, key, title in zip(axes, ("b1_tok_s", "b8_tok_s", "pp512_tok_s"), ("batch 1", "batch 8", "prompt 512")):
        for j, engine in enumerate(ENGINES):
            values = [next((r[key] for r in report["rows"] if r["type"] == t and r["engine"] == engine), 0)
                      for t in types]
            ax.bar([i + 0.4 * j for i in range(len(types))], values, width=0.4, label=engine)
        ax.set_xticks([i + 0.2 for i in range(len(types))], types, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("tok/s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    return save_figure(plt, fig, f"GGUF formats at the {report['shape']} shape: ours vs llama.cpp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.gguf_formats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["smollm2-135m"], choices=sorted(SHAPES),
                        help="one report per shape (default: %(default)s)")
    parser.add_argument("--types", nargs="+", default=list(TYPES), type=str.upper)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default=None, help="output file stem (default: gguf_formats_SHAPE)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    shapes, name = args.shape, args.name
    for args.shape in shapes:
        args.name = name or f"gguf_formats_{args.shape}"
        report = run(args)
        publish(report, markdown(report), plot, args, f"GGUF formats: {args.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
