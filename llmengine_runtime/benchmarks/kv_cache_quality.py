"""What an fp16 KV cache costs in quality: perplexity through the decode path, with fp32 and with fp16 caches.

    python -m llmengine_runtime.benchmarks.kv_cache_quality
        # the default model: fp32 weights and the GGUF's int4
    python -m llmengine_runtime.benchmarks.kv_cache_quality --tokens 512 --formats gguf

benchmarks.quality scores text with cache-less prefill forwards, which never read the KV cache. Here every token
is scored by a decode-shaped step instead: the engine computes the prompt's log-probs one token a step
(`max_num_batched_tokens=1`), so each step attends over keys and values read back from the cache, as decoding
does, through the one-call CPU decode step where it applies. Text: benchmarks.quality's (CPython's
`pydoc_data.topics`), its first `--tokens` (1024) tokens as one prompt. Reported: the perplexity with each cache
type and the fp16 cache's change against the fp32 cache with the same weights; the `auto` cache type serves
quantized weights on the CPU with fp16 (runtime/engine_setup.resolve_kv_cache_dtype).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from llmengine_runtime.benchmarks.common import OUT_DIR, fmt, machine_info, markdown_table
from llmengine_runtime.benchmarks.quality import corpus_text
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure

KV_TYPES = ["float32", "float16"]


def decode_perplexity(folder: Path, quantize: str, kv_cache_dtype: str, ids: list[int] | None, tokens: int,
                      progress: bool) -> tuple[float, list[int], float]:
    """(perplexity of ids[1:] given the tokens before, the ids, seconds) with one token computed per step."""
    from tqdm import tqdm

    from llmengine_runtime.runtime import LLM, SamplingParams

    llm = LLM(folder, dtype="float32", device="cpu", quantize=quantize, kv_cache_dtype=kv_cache_dtype,
              kv_cache_gib=0.25, max_num_batched_tokens=1, enable_prefix_caching=False)
    if ids is None:
        ids = llm.tokenizer.encode(corpus_text(), add_special_tokens=False)[:tokens]
    engine = llm.engine
    engine.add_request(ids, SamplingParams(max_new_tokens=1, prompt_log_probs=True, ignore_eos=True))
    started, log_probs = time.perf_counter(), None
    with tqdm(total=len(ids), desc=f"{quantize}, {kv_cache_dtype} cache", disable=not progress, leave=False) as bar:
        while engine.has_unfinished():
            for out in engine.step():
                log_probs = log_probs or out.prompt_log_probs
            bar.update(1)
    scored = log_probs[1:]
    return math.exp(-sum(scored) / len(scored)), ids, time.perf_counter() - started


def run(args: argparse.Namespace) -> int:
    import torch

    from llmengine_runtime.models.zoo import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(resolve_model(args.model))
    rows: list[dict[str, Any]] = []
    ids = None
    for quantize in args.formats:
        by_type = {}
        for kv in KV_TYPES:
            ppl, ids, seconds = decode_perplexity(folder, quantize, kv, ids, args.tokens, not args.no_progress)
            by_type[kv] = ppl
            print(f"{quantize}, {kv} cache: perplexity {ppl:.4f} ({seconds:.0f} s)", file=sys.stderr)
        rows.append({"format": quantize, "perplexity_fp32_cache": by_type["float32"],
                     "perplexity_fp16_cache": by_type["float16"],
                     "fp16_vs_fp32_pct": 100 * (by_type["float16"] / by_type["float32"] - 1)})
    report = {"benchmark": "kv_cache_quality", "machine": machine_info(), "model": args.model,
              "text": f"pydoc_data.topics, first {len(ids)} tokens, one decode step per token", "rows": rows}
    publish(report, markdown(report), plot, args, f"KV cache quality: {args.model}")
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [f"KV cache type and quality: {report['model']}, perplexity on {report['text']}.", ""]
    table = [[r["format"], fmt(r["perplexity_fp32_cache"], 4), fmt(r["perplexity_fp16_cache"], 4),
              f"{r['fp16_vs_fp32_pct']:+.3f}%"] for r in report["rows"]]
    lines.append(markdown_table(["weights", "fp32 cache", "fp16 cache", "fp16 vs fp32"], table))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    plt, fig, ax = new_figure(1, (6, 3.5))
    rows = report["rows"]
    ax.bar(range(len(rows)), [r["fp16_vs_fp32_pct"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["format"] for r in rows])
    ax.set_ylabel("perplexity, fp16 cache vs fp32 (%)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, f"KV cache type: {report['model']}", path)


def main(argv: list[str] | None = None) -> int:
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.kv_cache_quality",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, folder or .gguf (default: %(default)s)")
    parser.add_argument("--formats", nargs="+", default=["none", "gguf"], choices=["none", "int8", "int4", "gguf"],
                        help="weight formats (default: none gguf)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text scored (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="kv_cache_quality", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
