"""Prefix caching on a shared system prompt: the same workload with the prefix cache on and off, in one run.

    python -m llmengine_runtime.benchmarks.shared_prefix
        # default model, fp32, both arrival patterns
    python -m llmengine_runtime.benchmarks.shared_prefix --arrivals sequential --quantize int8

Workload: 16 requests whose prompts share a ~1,000-token system prompt (the first `--prefix-tokens` tokens of
CPython's `pydoc_data.topics`, every Python install carries it, in the model's chat template as the system
message), each followed by a different question of ~20 tokens; greedy, `--max-new-tokens` (32) each with eos
ignored, so every run emits the same number of tokens. Request 1 runs alone first (with caching on, it fills the
cache); then requests 2-16 arrive either all at once (`concurrent`: one batch, as many users behind one system
prompt) or one after another, each alone (`sequential`). Each (arrival, caching) pair gets a fresh engine (an
empty cache) warmed up by one unrelated short request.

Reported per pair: TTFT of request 1, TTFT p50/p90 of requests 2-16 (from their arrival to their first token)
and their ratio to request 1's, total tok/s (all output tokens / wall time of the whole workload, request 1
included), the on/off throughput ratio, the prefix-cache hit rate (hit / queried prompt tokens, from the block
manager) and whether each request's greedy tokens are identical with caching on and off. A model folder without
a tokenizer (random test weights) gets byte prompts (UTF-8 bytes modulo the vocabulary), without a template.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, distribution, fmt, machine_info, markdown_table
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure

QUESTIONS = [
    "Using only the reference above, explain in two sentences what the assert statement does.",
    "According to the text above, how does Python evaluate a boolean expression with and and or?",
    "Summarize what the documentation above says about augmented assignment statements, briefly please.",
    "From the reference above, what is the difference between a list display and a set display?",
    "Based on the text above, when is the else clause of a for loop executed in Python?",
    "What does the documentation above say about how attribute references are evaluated at run time?",
    "Give one short example, in the spirit of the text above, of a conditional expression in Python.",
    "According to the reference above, which statements may appear inside a class definition body?",
    "In plain words, how does the text above describe the behaviour of the break statement in loops?",
    "What does the reference above tell a reader about comparisons that are chained, like a < b < c?",
    "Based on the text above, explain what the pass statement is for and when one would use it.",
    "According to the documentation above, what happens when a function call has too many arguments?",
    "Summarize in one sentence what the text above says about binary arithmetic operations on numbers.",
    "From the reference above, how are string literals that are written next to each other combined?",
    "What does the documentation above say about the global statement and the names it declares?",
    "Explain briefly, using the text above, how the with statement calls the methods of a context manager.",
]


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def build_prompts(tokenizer: Any, vocab_size: int, prefix_tokens: int, num_requests: int) -> list[list[int]]:
    """Token ids of each request: the shared system prompt (cut to `prefix_tokens` tokens of the corpus), then
    question i. In the chat template when the tokenizer has one; byte ids without a tokenizer."""
    questions = [QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)) for i in range(num_requests)]
    if tokenizer is None:
        system = [b % vocab_size for b in corpus_text().encode()[:prefix_tokens]]
        return [system + [b % vocab_size for b in f"\n\nQuestion: {q}\nAnswer:".encode()[:24]] for q in questions]
    system = tokenizer.decode(tokenizer.encode(corpus_text(), add_special_tokens=False)[:prefix_tokens])
    if not tokenizer.has_chat_template:
        return [tokenizer.encode(f"{system}\n\nQuestion: {q}\nAnswer:", add_special_tokens=True) for q in questions]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                             {"role": "user", "content": q}]),
                             add_special_tokens=False) for q in questions]


def common_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share."""
    n = min(map(len, prompts))
    return next((i for i in range(n) if len({p[i] for p in prompts}) > 1), n)


def serve(engine: Any, prompts: list[list[int]], params: Any, bar: tqdm) -> tuple[list[float], list[list[int]]]:
    """Add `prompts` together and step the engine until all finish: (TTFT seconds, token ids) per prompt."""
    start = time.perf_counter()
    seqs = [engine.add_request(p, params) for p in prompts]
    ttft: dict[str, float] = {}
    tokens: dict[str, list[int]] = {seq.request_id: [] for seq in seqs}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.token_ids and out.request_id not in ttft:
                ttft[out.request_id] = time.perf_counter() - start
            tokens[out.request_id] += out.token_ids
            bar.update(out.finished)
    return [ttft[seq.request_id] for seq in seqs], [tokens[seq.request_id] for seq in seqs]


def warm_up_engine(engine: Any, params: Any) -> None:
    """The workload's step shapes once, on unrelated tokens: one prompt of two blocks and a bit alone, then three
    prompts sharing those two blocks together (with caching on, a prefill after cached blocks), twice."""
    bs, vocab = engine.block_manager.block_size, engine.config.vocab_size
    shared = [(i * 7 + 3) % vocab for i in range(2 * bs)]
    for group in ([shared + [5, 6, 7]], [shared + [8 + i] * (3 + i) for i in range(3)]) * 2:
        for p in group:
            engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()


def run_workload(engine: Any, prompts: list[list[int]], params: Any, arrival: str, bar: tqdm) -> dict[str, Any]:
    """Request 1 alone, then the rest together (`concurrent`) or one by one (`sequential`)."""
    bm = engine.block_manager
    bm.reset_stats()
    computed = engine.counters["tokens_computed"]
    started = time.perf_counter()
    ttfts, tokens = serve(engine, prompts[:1], params, bar)
    groups = [prompts[1:]] if arrival == "concurrent" else [[p] for p in prompts[1:]]
    for group in groups:
        t, toks = serve(engine, group, params, bar)
        ttfts, tokens = ttfts + t, tokens + toks
    wall = time.perf_counter() - started
    stats = bm.stats()
    rest = [t * 1e3 for t in ttfts[1:]]
    output_tokens = sum(map(len, tokens))
    return {"ttft_first_ms": ttfts[0] * 1e3, "ttft_rest_ms": distribution(rest),
            "ttft_rest_p50_vs_first": distribution(rest)["p50"] / (ttfts[0] * 1e3),
            "ttft_rest_p90_vs_first": distribution(rest)["p90"] / (ttfts[0] * 1e3),
            "ttft_all_ms": [t * 1e3 for t in ttfts], "wall_s": wall, "output_tokens": output_tokens,
            "tok_s": output_tokens / wall, "tokens_computed": engine.counters["tokens_computed"] - computed,
            "prefix_cache_queries": stats["prefix_cache_queries"], "prefix_cache_hits": stats["prefix_cache_hits"],
            "hit_rate": stats["prefix_cache_hits"] / stats["prefix_cache_queries"]
            if stats["prefix_cache_queries"] else 0.0, "token_ids": tokens}


def run(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.zoo import resolve_model
    from llmengine_runtime.runtime import SamplingParams
    from llmengine_runtime.runtime.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(resolve_model(args.model))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0, ignore_eos=True)
    warm_up = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    info = machine_info()
    rows: list[dict[str, Any]] = []
    prompts: list[list[int]] = []
    bar = tqdm(total=len(args.arrivals) * 2 * args.requests, desc="shared prefix", unit="req",
               disable=args.no_progress)
    for arrival in args.arrivals:
        for caching in (False, True):
            engine = Engine(folder, dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib,
                            block_size=args.block_size, enable_prefix_caching=caching, quantize=args.quantize)
            prompts = prompts or build_prompts(engine.tokenizer, engine.config.vocab_size, args.prefix_tokens,
                                               args.requests)
            warm_up_engine(engine, warm_up)
            bar.set_postfix_str(f"{arrival}, caching {'on' if caching else 'off'}")
            rows.append({"arrival": arrival, "prefix_caching": caching,
                         **run_workload(engine, prompts, params, arrival, bar)})
            engine = None
    bar.close()
    checks = []
    for arrival in args.arrivals:
        off, on = (next(r for r in rows if r["arrival"] == arrival and r["prefix_caching"] is c) for c in (False, True))
        on["tok_s_vs_off"] = on["tok_s"] / off["tok_s"]
        on["ttft_rest_p50_vs_off"] = on["ttft_rest_ms"]["p50"] / off["ttft_rest_ms"]["p50"]
        for i, (a, b) in enumerate(zip(off["token_ids"], on["token_ids"])):
            checks.append({"arrival": arrival, "request": i + 1, "match": a == b, "tokens": len(a),
                           "first_mismatch": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)})
    report = {"benchmark": "shared-prefix", "machine": info, "model": args.model, "folder": str(folder),
              "dtype": args.dtype, "quantize": args.quantize, "device": args.device, "block_size": args.block_size,
              "requests": args.requests, "prompt_tokens": [len(p) for p in prompts],
              "shared_prefix_tokens": common_prefix(prompts), "max_new_tokens": args.max_new_tokens,
              "rows": rows, "greedy_check": checks, "outputs_identical": all(c["match"] for c in checks)}
    publish(report, shared_prefix_markdown(report), shared_prefix_plot, args, f"shared prefix: {args.model}")
    return 0 if report["outputs_identical"] else 1


def shared_prefix_markdown(report: dict[str, Any]) -> str:
    """A header line, one row per (arrival, caching), and the greedy check. Figures only: the targets are in
    benchmarks/RESULTS.md."""
    lengths = report["prompt_tokens"]
    weights = f", weights {report['quantize']}" if report["quantize"] else ""
    lines = [f"Shared prefix: {report['model']} ({report['dtype']}{weights}) on {report['device']}, "
             f"{report['requests']} requests of {min(lengths)}-{max(lengths)} prompt tokens sharing the first "
             f"{report['shared_prefix_tokens']}, greedy, {report['max_new_tokens']} new tokens each (eos ignored); "
             "request 1 alone first, then requests 2-N (concurrent: all at once; sequential: one by one). TTFT in "
             "ms; tok/s = all output tokens / wall time of the whole workload; hit rate = prompt tokens found in "
             "the prefix cache / prompt tokens looked up.", ""]
    header = ["arrival", "prefix caching", "TTFT req 1", "TTFT 2-N p50 / p90", "p50 / req 1", "tok/s",
              "tok/s on / off", "hit rate", "tokens computed"]
    table = [[r["arrival"], "on" if r["prefix_caching"] else "off", fmt(r["ttft_first_ms"]),
              f"{fmt(r['ttft_rest_ms']['p50'])} / {fmt(r['ttft_rest_ms']['p90'])}",
              f"{r['ttft_rest_p50_vs_first']:.2f}x", fmt(r["tok_s"], 2),
              f"**{r['tok_s_vs_off']:.2f}x**" if "tok_s_vs_off" in r else "-",
              f"{100 * r['hit_rate']:.0f}%" if r["prefix_caching"] else "-", r["tokens_computed"]]
             for r in report["rows"]]
    lines.append(markdown_table(header, table))
    checks = report["greedy_check"]
    bad = [c for c in checks if not c["match"]]
    lines.append(f"Greedy tokens with caching on vs off: {len(checks) - len(bad)}/{len(checks)} requests identical"
                 + ("." if not bad else "; differing: " + ", ".join(
                     f"{c['arrival']} request {c['request']} from token {c['first_mismatch']}" for c in bad[:8]) + "."))
    return "\n".join(lines) + "\n"


def shared_prefix_plot(report: dict[str, Any], path: Path) -> Path:
    """TTFT (request 1, p50 and p90 of the rest) and tok/s, one group per (arrival, caching)."""
    rows = report["rows"]
    labels = [f"{r['arrival']}\ncaching {'on' if r['prefix_caching'] else 'off'}" for r in rows]
    plt, fig, (ax_ttft, ax_tok) = new_figure(2, (11, 4.2))
    xs = list(range(len(rows)))
    for offset, name, values in ((-0.27, "request 1", [r["ttft_first_ms"] for r in rows]),
                                 (0.0, "2-N p50", [r["ttft_rest_ms"]["p50"] for r in rows]),
                                 (0.27, "2-N p90", [r["ttft_rest_ms"]["p90"] for r in rows])):
        ax_ttft.bar([x + offset for x in xs], values, width=0.27, label=name)
    ax_ttft.set_yscale("log")  # request 1's prefill and a cache hit's are an order of magnitude apart
    ax_ttft.set_ylabel("TTFT (ms, log scale)")
    ax_ttft.legend(fontsize=8)
    ax_tok.bar(xs, [r["tok_s"] for r in rows], color=["tab:gray" if not r["prefix_caching"] else "tab:green"
                                                       for r in rows])
    ax_tok.set_ylabel("output tok/s, whole workload")
    for ax in (ax_ttft, ax_tok):
        ax.set_xticks(xs, labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, f"shared prefix: {report['model']}, {report['requests']} requests, "
                       f"{report['shared_prefix_tokens']} shared tokens", path)


def add_args(parser: argparse.ArgumentParser) -> None:
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or folder (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="activations and KV cache (default: %(default)s)")
    parser.add_argument("--quantize", default=None, choices=["none", "int8", "int4", "gguf"],
                        help="weight-only quantization (default: float weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arrivals", nargs="+", default=["concurrent", "sequential"],
                        choices=["concurrent", "sequential"], help="how requests 2-N arrive (default: both)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="system prompt length (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="shared_prefix", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.shared_prefix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    if args.requests < 2:
        parser.error("--requests must be at least 2")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
