"""What the weight formats cost in quality: perplexity on a fixed English text, and greedy agreement with fp32.

    python -m llmengine_runtime.benchmarks.quality
        # the default model: fp32, int8, int4 g32, int4 from the GGUF
    python -m llmengine_runtime.benchmarks.quality --model FOLDER --formats none int8 int4 --tokens 4096

Text: the help topics of CPython's `pydoc_data.topics` (every Python install carries them), joined in key order,
tokenized with the model's tokenizer; the first `--tokens` (8192) tokens. Perplexity: exp of the mean negative
log-likelihood of each token given the tokens before it in its window; windows of min(context, 1024) tokens side
by side, each scored by one cache-less prefill forward (`AttentionMetadata.for_prompts`); a window's first token
has nothing before it and is not scored.

Greedy agreement: for each of 8 prompts, the share of 64 greedy tokens (eos ignored) produced before the first
token that differs from fp32 with the same weights, averaged; "identical" counts the prompts with all 64 equal.
For the default model "the same weights" are the GGUF's, dequantized: the imported fp32 folder.

Formats: none (fp32), int8 (per output channel, quantized at load), int4 g32 (groups of 32, quantized at load from
the fp32 weights), gguf (the integers of the GGUF the folder came from: for the default model its Q4_1 projections
and Q8_0 head). Targets, reported and not asserted: perplexity within 1% of fp32 for int8, 10% for int4 g32, 2%
for the GGUF's int4.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, fmt, machine_info, markdown_table
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure

PROMPTS = [
    "The history of the printing press begins",
    "def binary_search(items, target):",
    "Here are three tips for staying healthy:",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The main difference between a list and a tuple in Python is",
    "Photosynthesis is the process by which",
]
LABELS = {"none": "fp32", "int8": "int8 (per channel)", "int4": "int4 g{group} (on the fly)",
          "gguf": "int4 from the GGUF"}
TARGETS = {"int8": 1.0, "int4": 10.0, "gguf": 2.0}  # allowed perplexity increase over fp32, percent


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, progress: bool = True) -> tuple[float, int]:
    """(exp(mean NLL), tokens scored) over windows of `window` tokens side by side, each one prefill forward."""
    from llmengine_runtime.models.attention import AttentionMetadata

    nll, scored = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        chunk = torch.tensor(ids[start:start + window])
        hidden = model(chunk, torch.arange(len(chunk)), AttentionMetadata.for_prompts([len(chunk)]))
        logits = model.compute_logits(hidden[:-1]).float()
        nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        scored += len(chunk) - 1
    return math.exp(nll / scored), scored


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """(mean share of each sequence before its first difference from the reference, sequences identical)."""
    shares = []
    for got, ref in zip(tokens, reference):
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        shares.append(first / len(ref))
    return sum(shares) / len(shares), sum(s == 1.0 for s in shares)


def run(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.zoo import resolve_model
    from llmengine_runtime.runtime import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(resolve_model(args.model))
    formats = ["none", *[f for f in args.formats if f != "none"]]  # fp32 first: the reference
    greedy = SamplingParams(max_new_tokens=args.greedy_tokens, temperature=0, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    reference_tokens = None
    ids = None
    for fmt_name in formats:
        started = time.perf_counter()
        group = args.group_size if fmt_name == "int4" else None
        llm = LLM(folder, dtype="float32", device="cpu", kv_cache_gib=0.25, quantize=fmt_name, quant_group_size=group)
        model = llm.engine.model
        load_s = time.perf_counter() - started
        if ids is None:
            ids = llm.tokenizer.encode(corpus_text(), add_special_tokens=False)[:args.tokens]
            window = min(llm.config.max_position_embeddings, args.window)
        print(f"{fmt_name}: {model.quantization or 'float'} (loaded in {load_s:.1f} s)", file=sys.stderr)
        started = time.perf_counter()
        ppl, scored = perplexity(model, ids, window, not args.no_progress)
        ppl_s = time.perf_counter() - started
        tokens = [r.token_ids for r in llm.generate(PROMPTS, greedy, progress=False)]
        if reference_tokens is None:
            reference_tokens = tokens
        share, identical = agreement(tokens, reference_tokens)
        rows.append({"format": fmt_name, "weights": model.quantization or "float32",
                     "label": LABELS[fmt_name].format(group=args.group_size), "perplexity": ppl,
                     "tokens_scored": scored, "greedy_agreement": share, "greedy_identical": identical,
                     "load_s": load_s, "perplexity_s": ppl_s,
                     "first_text": llm.tokenizer.decode(tokens[0])})
        llm = model = None
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_vs_fp32_pct"] = 100 * (row["perplexity"] / base - 1)
        target = TARGETS.get(row["format"])
        row["target_pct"] = target
        row["meets_target"] = None if target is None else row["perplexity_vs_fp32_pct"] <= target
    report = {"benchmark": "quality", "machine": machine_info(), "model": args.model, "folder": str(folder),
              "text": f"pydoc_data.topics, first {len(ids)} tokens", "window": window,
              "prompts": PROMPTS, "greedy_tokens": args.greedy_tokens, "rows": rows}
    publish(report, quality_markdown(report), quality_plot, args, f"quality: {args.model}")
    return 0


def quality_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"Quality: {report['model']}, perplexity on {report['text']} (windows of {report['window']}, "
             f"{rows[0]['tokens_scored']} tokens scored); greedy agreement with fp32 over {len(report['prompts'])} "
             f"prompts x {report['greedy_tokens']} tokens (share before the first difference, mean).", ""]
    header = ["format", "weights", "perplexity", "vs fp32", "target", "greedy agreement", "identical", "load s"]
    def target(r: dict[str, Any]) -> str:
        return "-" if r["target_pct"] is None else \
            f"<= {r['target_pct']:g}% ({'met' if r['meets_target'] else 'missed'})"

    table = [[r["label"], r["weights"], fmt(r["perplexity"], 3), f"{r['perplexity_vs_fp32_pct']:+.2f}%", target(r),
              f"{100 * r['greedy_agreement']:.0f}%", f"{r['greedy_identical']}/{len(report['prompts'])}",
              fmt(r["load_s"])] for r in rows]
    lines.append(markdown_table(header, table))
    return "\n".join(lines)


def quality_plot(report: dict[str, Any], path: Path) -> Path:
    """Perplexity increase over fp32 (with the targets) and greedy agreement, one bar per format."""
    rows = report["rows"]
    plt, fig, (ax_ppl, ax_agree) = new_figure(2, (10, 4))
    labels = [r["label"].replace(" (", "\n(") for r in rows]
    xs = range(len(rows))
    ax_ppl.bar(xs, [r["perplexity_vs_fp32_pct"] for r in rows], color="tab:blue")
    for x, r in zip(xs, rows):
        if r["target_pct"] is not None:
            ax_ppl.hlines(r["target_pct"], x - 0.4, x + 0.4, colors="tab:red", linestyles="--")
    ax_ppl.set_ylabel("perplexity vs fp32 (%), target dashed")
    ax_agree.bar(xs, [100 * r["greedy_agreement"] for r in rows], color="tab:green")
    ax_agree.set_ylabel("greedy tokens before the first difference (%)")
    ax_agree.set_ylim(0, 105)
    for ax in (ax_ppl, ax_agree):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, f"quality: {report['model']} ({report['text']})", path)


def add_args(parser: argparse.ArgumentParser) -> None:
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, folder or .gguf (default: %(default)s)")
    parser.add_argument("--formats", nargs="+", default=["none", "int8", "int4", "gguf"],
                        choices=["none", "int8", "int4", "gguf"],
                        help="weight formats; fp32 (none) always runs first, as the reference")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of text scored (default: %(default)s)")
    parser.add_argument("--window", type=int, default=1024, help="longest window (default: %(default)s)")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="quality", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
