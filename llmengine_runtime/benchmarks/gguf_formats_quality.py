"""`--quantize TYPE` at load against llama.cpp's TYPE file built from an F32 export of the same weights.

    python -m llmengine_runtime.benchmarks.gguf_formats_quality                 # default model, q4_k_m
    python -m llmengine_runtime.benchmarks.gguf_formats_quality --types q4_k_m q8_0 --tokens 8192

The model folder's fp32 weights (the default model's: its GGUF, dequantized by `llmengine convert`) are quantized
at load by us (models/gguf_quantize_model.py). llama.cpp gets the same weights as an F32 GGUF (benchmarks/
gguf_formats_files.py `export_f32_gguf`), quantized by its `llama_model_quantize`. Reported per type:
- whether every quantized tensor's bytes equal the llama.cpp file's (q/k rows compared in HF order);
- perplexity, ours and llama.cpp's (llama-cpp-python, logits of every position), on benchmarks/quality.py's text
  and windows, with the same token ids, beside fp32 (ours on the folder, llama.cpp on the F32 export);
- greedy agreement (quality.py's measure, 8 prompts x 64 tokens): ours vs llama.cpp on its file, and vs our fp32.
The issue's goal: our perplexity within 0.5% of llama.cpp's for the same type.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from llmengine_runtime.benchmarks.common import OUT_DIR, fmt, machine_info, markdown_table
from llmengine_runtime.benchmarks.gguf_formats_files import export_f32_gguf, llama_quantize
from llmengine_runtime.benchmarks.gguf_formats_llamacpp import extra_buffer_types, high_level_model_params
from llmengine_runtime.benchmarks.quality import PROMPTS, agreement, corpus_text, perplexity


def llamacpp_perplexity(llm, ids: list[int], window: int) -> float:
    """quality.perplexity's measure for a llama_cpp.Llama made with logits_all: windows side by side, each
    evaluated from an empty cache, every token after a window's first scored (log-softmax in float64)."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        nll += float((log_z - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        scored += len(chunk) - 1
    return math.exp(nll / scored)


def llamacpp_greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from llmengine_runtime.benchmarks.llamacpp import run_llamacpp

    return [run_llamacpp(llm, p, n).token_ids for p in prompts]


def bytes_equal(model, gguf: Path) -> tuple[int, int]:
    """(tensors whose bytes equal the GGUF's, tensors compared): every projection part and the embedding."""
    import torch
    from gguf import GGUFReader

    from llmengine_runtime.models.causal_lm import CausalLM
    from llmengine_runtime.models.gguf import unpermute_rotary
    from llmengine_runtime.models.gguf_linear import GGUFRowParts
    from llmengine_runtime.models.gguf_quant import rotary_heads_for
    from llmengine_runtime.models.gguf_quantize_model import gguf_name, projections

    c = model.config
    heads = {"num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads}
    theirs = {t.name: t for t in GGUFReader(gguf).tensors}
    with torch.device("meta"):
        float_layout = CausalLM(c)  # the projections' checkpoint names, as before quantization
    equal = total = 0
    for module, names in projections(float_layout).items():
        layer = model.get_submodule(module)
        rows = [r for p in (layer.parts if isinstance(layer, GGUFRowParts) else [layer]) for r in p.raw]
        for name in names:
            t = theirs[gguf_name(name)]
            data = np.asarray(t.data)
            if (h := rotary_heads_for(t.name, heads)) is not None:
                data = unpermute_rotary(data, h)
            mine, rows = torch.stack(rows[:len(data)]).numpy(), rows[len(data):]
            equal += int(np.array_equal(mine, data))
            total += 1
    table = theirs["token_embd.weight"]
    equal += int(np.array_equal(np.asarray(table.data), model.embed.raw.numpy()))
    return equal, total + 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    import torch

    from llmengine_runtime.models.gguf import gguf_source
    from llmengine_runtime.models.zoo import resolve_model
    from llmengine_runtime.runtime import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    folder = Path(resolve_model(args.model))
    source = gguf_source(folder) or (Path(args.gguf) if args.gguf else None)
    if source is None:
        raise SystemExit(f"{folder} records no GGUF (gguf_source.json); pass --gguf with the weights as a GGUF")
    f32 = export_f32_gguf(source)
    greedy = SamplingParams(max_new_tokens=args.greedy_tokens, temperature=0, ignore_eos=True)

    def ours(quantize: str) -> tuple[Any, float, list[list[int]]]:
        llm = LLM(folder, dtype="float32", device="cpu", kv_cache_gib=0.25, quantize=quantize)
        model = llm.engine.model
        tokens = [r.token_ids for r in llm.generate(prompt_ids, greedy, progress=False)]
        return model, perplexity(model, ids, window, not args.no_progress)[0], tokens

    def theirs(gguf: Path) -> tuple[float, list[list[int]]]:
        with high_level_model_params():  # no AMX where it faults (benchmarks/gguf_formats_llamacpp.py)
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=window, n_batch=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, logits_all=True, verbose=False)
        return llamacpp_perplexity(llm, ids, window), llamacpp_greedy(llm, prompt_ids, args.greedy_tokens)

    tokenizer = LLM(folder, dtype="float32", device="cpu", kv_cache_gib=0.01, quantize="none").tokenizer
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)[:args.tokens]
    window = min(args.window, 4096)
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    _, fp32_ppl, fp32_tokens = ours("none")
    llamacpp_fp32_ppl, _ = theirs(f32)
    print(f"fp32: ours {fp32_ppl:.4f}, llama.cpp (F32 GGUF) {llamacpp_fp32_ppl:.4f}", file=sys.stderr)
    rows = []
    for qtype in args.types:
        gguf = llama_quantize(f32, f32.with_name(f"{f32.stem.removesuffix('.F32')}.{qtype.upper()}.gguf"), qtype)
        model, ppl, tokens = ours(qtype)
        equal, total = bytes_equal(model, gguf)
        model = None
        their_ppl, their_tokens = theirs(gguf)
        share_llamacpp, identical = agreement(tokens, their_tokens)
        share_fp32, _ = agreement(tokens, fp32_tokens)
        rows.append({"type": qtype, "bytes_equal": equal, "tensors": total, "ours_ppl": ppl,
                     "llamacpp_ppl": their_ppl, "ratio": ppl / their_ppl,
                     "ours_vs_fp32_pct": 100 * (ppl / fp32_ppl - 1),
                     "greedy_vs_llamacpp": share_llamacpp, "greedy_identical_llamacpp": identical,
                     "greedy_vs_fp32": share_fp32, "llamacpp_greedy_vs_fp32": agreement(their_tokens, fp32_tokens)[0]})
        print(rows[-1], file=sys.stderr)
    return {"benchmark": "gguf_formats_quality", "machine": machine_info(), "model": args.model,
            "folder": str(folder), "f32_gguf": str(f32), "text": f"pydoc_data.topics, first {len(ids)} tokens",
            "window": window, "fp32_ppl": fp32_ppl, "llamacpp_fp32_ppl": llamacpp_fp32_ppl, "rows": rows,
            "greedy_tokens": args.greedy_tokens, "prompts": PROMPTS, "llamacpp_extra_bufts": extra_buffer_types()}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"--quantize TYPE at load vs llama.cpp's TYPE from an F32 export of the same weights: {report['model']}, "
             f"perplexity on {report['text']} (windows of {report['window']}); fp32 {report['fp32_ppl']:.4f} (ours), "
             f"{report['llamacpp_fp32_ppl']:.4f} (llama.cpp on the F32 GGUF). Greedy: share of "
             f"{report['greedy_tokens']} tokens before the first difference, mean over {len(report['prompts'])} "
             "prompts.", ""]
    header = ["type", "bytes equal", "ours ppl", "llama.cpp ppl", "ours / llama.cpp", "ours vs fp32",
              "greedy vs llama.cpp", "greedy vs fp32 (ours / llama.cpp)"]
    table = [[r["type"], f"{r['bytes_equal']}/{r['tensors']}", fmt(r["ours_ppl"], 4), fmt(r["llamacpp_ppl"], 4),
              f"{r['ratio']:.4f}", f"{r['ours_vs_fp32_pct']:+.2f}%",
              f"{100 * r['greedy_vs_llamacpp']:.0f}% ({r['greedy_identical_llamacpp']} identical)",
              f"{100 * r['greedy_vs_fp32']:.0f}% / {100 * r['llamacpp_greedy_vs_fp32']:.0f}%"] for r in report["rows"]]
    lines.append(markdown_table(header, table))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llmengine_runtime.benchmarks.common import write_outputs
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.gguf_formats_quality",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or folder with fp32 safetensors")
    parser.add_argument("--gguf", default=None, help="the same weights as a GGUF (default: gguf_source.json's)")
    parser.add_argument("--types", nargs="+", default=["q4_k_m"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="gguf_formats_quality")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    print("wrote " + ", ".join(str(p) for p in write_outputs(Path(args.out_dir), args.name, report, text).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
