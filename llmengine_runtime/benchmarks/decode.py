"""Offline decode benchmark: our runtime against transformers `generate` on the same workload, in one run.

    python -m llmengine_runtime.benchmarks.decode                  # default model, batch 1, 128 tokens, fp32 + bf16
    python -m llmengine_runtime.benchmarks.decode --dtype float32 bfloat16 --batch-sizes 1 4 16 --check-text
    python -m llmengine_runtime.benchmarks.decode --model llama-2-7b --num-layers 2 --dtype bfloat16
        # random weights, real shapes
    python -m llmengine_runtime.benchmarks.decode --speculative ngram --dtype float32
        # with vs without speculation (speculative.py)
    python -m llmengine_runtime.benchmarks.decode --dtype float32 --quantize none int8 int4 gguf --baseline llama.cpp \
        --threads 2
        # weight formats (gguf: the default model's GGUF integers) against llama.cpp on the same GGUF (batch 1)

Per implementation, dtype and batch size, median and min/max over the repeats:
- TTFT: submit -> first token (mean over the batch's sequences); it includes the prefill.
- TPOT: time per decode step once every sequence has its first token (= time per output token per sequence).
- decode tok/s: tokens generated after that moment / the time they took (all sequences together).
- total tok/s: all output tokens / the whole generate call, prefill included.
- peak memory: on CPU the peak resident set minus the resident set before the model was loaded (weights, KV
  cache, activations); on CUDA torch.cuda.max_memory_allocated.
- weight bandwidth: the weight bytes one decode step reads (every matrix, the LM head; not the embedding table)
  / TPOT, and that as a share of a large tensor copy's bandwidth (read + write) measured in the same run: the
  share of the weight-bandwidth roofline the format reaches. Quantized formats count their integer weights and
  scales; llama.cpp the GGUF's tensor bytes.

`--quantize` runs our engine once per weight format (none, int8, int4, gguf = a GGUF's own integers); `--baseline
llama.cpp` replaces transformers by llama-cpp-python (benchmarks/llamacpp.py) on the GGUF the model came from (or
--gguf), with the same threads, prompt ids and number of tokens, one sequence at a time (batch 1 only).
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, PeakMemory, copy_bandwidth, machine_info, rss_bytes
from llmengine_runtime.benchmarks.decode_runners import (
    decode_weight_bytes,
    hf_decode_weight_bytes,
    run_hf,
    run_llamacpp_batch,
    run_ours,
    summarize_runs,
)
from llmengine_runtime.benchmarks.random_model import resolve_folder
from llmengine_runtime.benchmarks.report import decode_markdown, decode_plot, publish

DEFAULT_PROMPT = "1, 2, 3, 4, 5, 6,"


def make_prompts(args, tokenizer, vocab_size: int, batch_size: int) -> list[list[int]]:
    """The text prompt for every row, or distinct random token ids of --prompt-len per row."""
    if args.prompt_len is None and tokenizer is not None:
        return [tokenizer.encode(args.prompt, add_special_tokens=True)] * batch_size
    length = args.prompt_len or 16
    generator = torch.Generator().manual_seed(args.seed + batch_size)
    return torch.randint(min(16, vocab_size - 1), vocab_size, (batch_size, length), generator=generator).tolist()


def run(args: argparse.Namespace) -> int:
    if args.speculative:
        from llmengine_runtime.benchmarks import speculative

        return speculative.run(args)
    args.batch_sizes = args.batch_sizes or [1]
    from llmengine_runtime.models.config import load_config
    from llmengine_runtime.models.loader import parse_dtype, resolve_device
    from llmengine_runtime.models.tokenizer import TOKENIZER_FILES, Tokenizer, stop_token_ids
    from llmengine_runtime.runtime import LLM, SamplingParams

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder, random_weights = resolve_folder(args)
    config = load_config(folder)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = Tokenizer.from_folder(folder) if has_tokenizer else None
    stop = stop_token_ids(config, tokenizer)
    prompts = {b: make_prompts(args, tokenizer, config.vocab_size, b) for b in args.batch_sizes}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    info = machine_info()
    copy_bw = copy_bandwidth(device)
    formats = args.quantize or ["none"]
    impls = [("ours", q) for q in formats] + ([] if args.no_baseline else [(args.baseline, "none")])
    bar = tqdm(total=len(args.dtype) * len(impls) * len(args.batch_sizes) * (args.warmup + args.repeats),
               desc="decode", unit="run", disable=args.no_progress)
    rows, checks, weight_bytes = [], [], {}
    threads = args.threads or torch.get_num_threads()
    llamacpp_outputs = None
    for d, dtype in enumerate(args.dtype):
        outputs: dict[str, dict[int, list[list[int]]]] = {}
        for impl, quantize in impls:
            if impl == "llama.cpp" and d > 0:  # one llama.cpp run serves every dtype of ours
                continue
            gc.collect()
            base_rss = rss_bytes()
            bar.set_description(f"decode {impl} {dtype} {quantize} (loading)")
            key = dtype if quantize == "none" else f"{dtype} {quantize}"
            weights = "float"
            if impl == "ours":
                prompt_budget = max(len(p) for ps in prompts.values() for p in ps) + args.max_new_tokens + 32
                kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim \
                    * parse_dtype(dtype).itemsize * prompt_budget * max(args.batch_sizes)
                llm = LLM(folder, dtype=dtype, device=str(device), max_num_seqs=max(args.batch_sizes),
                          kv_cache_gib=args.kv_cache_gib or max(0.01, 1.25 * kv_bytes / (1 << 30)),
                          compile=args.compile, quantize=quantize, quant_group_size=args.quant_group_size,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_prefix_caching=False)  # every repeat prefills its whole prompt (TTFT)
                weight_bytes[key] = decode_weight_bytes(llm.engine.model)
                weights = llm.engine.model.quantization or "float"
                generate = lambda ps: run_ours(llm, ps, params, device)  # noqa: B023
            elif impl == "llama.cpp":
                from llmengine_runtime.benchmarks import llamacpp

                gguf = llamacpp.baseline_gguf(args.gguf, folder)
                key = "llama.cpp"
                weight_bytes[key], weights = llamacpp.gguf_weight_bytes(gguf)
                llm = llamacpp.load(gguf, threads)
                generate = lambda ps: run_llamacpp_batch(llm, ps, args.max_new_tokens)  # noqa: B023
            else:
                import transformers

                transformers.logging.set_verbosity_error()
                transformers.logging.disable_progress_bar()
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype))
                model = model.to(device).eval()
                weight_bytes[key] = hf_decode_weight_bytes(model)  # (ours may have run quantized formats only)
                generate = lambda ps: run_hf(model, ps, args.max_new_tokens, args.ignore_eos, stop, device)  # noqa: B023
            label = impl if quantize == "none" else f"{impl} {quantize}"
            outputs[label] = {}
            for b in args.batch_sizes:
                if impl == "llama.cpp" and b > 1:
                    bar.update(args.warmup + args.repeats)
                    continue
                bar.set_description(f"decode {label} {dtype} batch {b}")
                memory = PeakMemory(device)
                memory.start(base_rss)
                runs = []
                for i in range(args.warmup + args.repeats):
                    result = generate(prompts[b])
                    if i >= args.warmup:
                        runs.append(result)
                    bar.update(1)
                outputs[label][b] = runs[0].token_ids
                row = {"impl": impl, "dtype": dtype if impl != "llama.cpp" else "-", "weights": weights,
                       "quantize": quantize, "batch_size": b, "prompt_tokens": len(prompts[b][0]),
                       **summarize_runs(runs, weight_bytes[key], copy_bw),
                       "peak_mem_mib": memory.peak_bytes() / (1 << 20)}
                rows.append(row)
            if impl == "ours":
                llm.close()  # its tensor-parallel workers, if any
            llm = model = generate = None  # free this implementation before loading the next
        llamacpp_outputs = outputs.get("llama.cpp", llamacpp_outputs)
        for label in (label for label in outputs if label.startswith("ours")):
            name = f"{dtype} {label.removeprefix('ours').strip()}".strip()  # "float32", "float32 int8"
            if "transformers" in outputs:
                checks += compare_outputs(name, outputs[label], outputs["transformers"], stop, tokenizer)
            if llamacpp_outputs and 1 in outputs[label]:  # batch 1 only; the same integers: gguf
                checks += [dict(c, baseline="llama.cpp") for c in compare_outputs(
                    name, {1: outputs[label][1]}, llamacpp_outputs, stop, tokenizer)]
    bar.close()
    report = {"benchmark": "decode", "machine": info, "model": args.model, "folder": str(folder),
              "random_weights": random_weights, "num_layers": config.num_layers, "device": str(device),
              "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos, "warmup": args.warmup,
              "repeats": args.repeats, "copy_bandwidth_gb_s": copy_bw / 1e9, "weight_bytes": weight_bytes,
              "baseline": None if args.no_baseline else args.baseline, "threads": threads,
              "tensor_parallel_size": args.tensor_parallel_size,
              "memory": PeakMemory(device).kind, "rows": rows, "text_check": checks}
    publish(report, decode_markdown(report, show_text=args.check_text), decode_plot, args, f"decode: {args.model}")
    return 0


def compare_outputs(dtype, ours, theirs, stop, tokenizer) -> list[dict]:
    """Greedy tokens of ours vs transformers per batch size and row, up to our first stop token (the baseline
    masks eos until max_new_tokens)."""
    checks = []
    for b in ours:
        for row, (a, h) in enumerate(zip(ours[b], theirs[b])):
            n = next((i for i, t in enumerate(a) if t in stop), len(a))
            mismatch = next((i for i in range(n) if i >= len(h) or a[i] != h[i]), None)
            check = {"dtype": dtype, "batch_size": b, "row": row, "match": mismatch is None, "first_mismatch": mismatch}
            if tokenizer is not None and row == 0:
                check["ours_text"] = tokenizer.decode(a, skip_special_tokens=False)
                check["transformers_text"] = tokenizer.decode(h, skip_special_tokens=False)
            checks.append(check)
    return checks


def add_args(parser: argparse.ArgumentParser) -> None:
    from llmengine_runtime.models.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or model folder (default: %(default)s)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights at the zoo model's shapes (implied by --num-layers/--override)")
    parser.add_argument("--num-layers", type=int, default=None, help="random weights with this many layers")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config.json field of the random model (e.g. hidden_size=256); repeatable")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="ours on N ranks (N - 1 worker processes; one GPU each on CUDA; on CPU the cores are "
                             "shared, each rank gets cores/N threads) (default: 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile our decode step (the warm-up run pays the compile)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 1 (with --speculative: 1 and 4)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt, every row (default: %(default)r)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="random token-id prompts of this length instead (no tokenizer: default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="always generate --max-new-tokens (default: on)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument("--baseline", default="transformers", choices=["transformers", "llama.cpp"],
                        help="transformers generate on the same folder, or llama-cpp-python on the same GGUF "
                             "(batch 1; pip install '.[llamacpp]') (default: %(default)s)")
    parser.add_argument("--gguf", default=None, help="the GGUF for --baseline llama.cpp (default: the one the model "
                                                     "folder came from, as recorded by `llmengine convert`)")
    parser.add_argument("--quantize", nargs="+", default=None, choices=["none", "int8", "int4", "gguf"],
                        help="our weight formats, one run each (default: none; gguf: the integers of the GGUF the "
                             "model came from, what `llmengine serve` runs on CPU by default)")
    parser.add_argument("--quant-group-size", type=int, default=None, help="int4 group size (default: 64 or 32)")
    parser.add_argument("--check-text", action="store_true", help="also print ours' and the baseline's greedy text")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="default: what the workload needs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="decode", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--speculative", default=None, metavar="ngram|MODEL",
                        help="instead: our engine with vs without speculative decoding (n-gram or a draft model), "
                             "on input-grounded and free-generation prompts (benchmarks/speculative.py)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="k: proposals per step (default: 4)")
    parser.add_argument("--prompt-lookup-min", type=int, default=1, help="n-gram: shortest pattern (default: 1)")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="n-gram: longest pattern (default: 4)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
