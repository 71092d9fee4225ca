"""`llmengine serve`: load one or more models and serve them over HTTP with uvicorn.

    llmengine serve                                  # the default model on 127.0.0.1:5005
    llmengine serve --model smollm2-135m-instruct --model mine=/path/to/folder --api-key KEY
    llmengine serve --model tiny=/path/to/model.Q4_0.gguf --quantize auto   # a GGUF as it is, int4 kept

The port opens at once; /readyz answers 503 until every model is loaded, then the server prints how to
call it. On Ctrl-C (SIGINT) or SIGTERM, requests in flight get `GRACE_SECONDS` to finish, then an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from llmengine_runtime.models.zoo import DEFAULT_MODEL, parse_model_arg
from llmengine_runtime.runtime.engine_setup import KV_CACHE_DTYPE_NAMES
from llmengine_runtime.server import logs
from llmengine_runtime.server.app import create_app
from llmengine_runtime.server.tools import TOOL_PARSERS

GRACE_SECONDS = 10.0


class GracefulServer(uvicorn.Server):
    """uvicorn, draining the app first on shutdown: new requests get 503, requests in flight get the
    grace period, then an error (an error chunk for streams), before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, grace: float = GRACE_SECONDS) -> None:
        super().__init__(config)
        self.grace = grace

    async def shutdown(self, sockets: Any = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "server", None)
        if state is not None:
            await state.drain(self.grace)
        await super().shutdown(sockets)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=[], metavar="NAME[=PATH]",
                        help=f"a model to serve: a zoo name, a folder, a llama .gguf file, or NAME=PATH to serve a "
                             f"folder or GGUF under a name; repeat to serve several (default: {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5005)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU, the checkpoint's dtype on CUDA")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="KV-cache size (default: sized by the engine)")
    parser.add_argument("--api-key", default=None,
                        help="require this key on every route but health (default: $LLMENGINE_API_KEY; none = open)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests in flight (waiting + running) beyond which new ones get 429")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="recompute every prompt (default: reuse the KV of prompt prefixes seen before)")
    parser.add_argument("--deterministic", action="store_true",
                        help="batch-invariant kernels on CUDA: a request's numbers do not depend on the other "
                             "requests in the step (slower; untested on a GPU so far; on CPU always so, a no-op)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (faster decoding on CPU; ~1 min to start the first time)")
    parser.add_argument("--batch-dir", type=Path, default=None,
                        help="the only directory batch jobs read and write; relative paths are taken under it "
                             "(default: ~/.cache/llmengine/batch, created on start)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="the only directory POST /v1/llm/model-endpoints may load checkpoints from "
                             "(default: the local models folder, ~/.cache/llmengine/models)")
    add_speculative_args(parser)
    add_quantize_args(parser)
    add_parallel_args(parser)


def threads_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: accepted 'auto' or an integer >= 1")
    return int(value)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Threads and tensor parallelism (`llmengine serve` and `llmengine generate`)."""
    parser.add_argument("--threads", type=threads_arg, default="auto", metavar="auto|N",
                        help="torch CPU threads: N, or auto = time decode steps with 1 thread and with all and keep "
                             "the faster, again every few hundred steps (a busy neighbour process makes 1 faster) "
                             "(default: auto)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split each layer over N ranks: this process and N - 1 workers (one GPU each on CUDA, "
                             "NCCL; gloo on CPU); with several --model, only one model per process can use it "
                             "(default: 1)")


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    """Weight quantization's options (`llmengine serve` and `llmengine generate`)."""
    from llmengine_runtime.models.loader import gguf_mixtures

    parser.add_argument("--quantize", default="auto", choices=["none", "int8", "int4", "auto", *gguf_mixtures()],
                        type=str.lower, metavar="{none,auto,q4_k_m,q5_k_m,q6_k,q8_0,q4_0,...,int8,int4}",
                        help="weight-only quantization; activations keep --dtype. auto (the "
                             "default): on CPU, a model that came from a GGUF (the default model; a .gguf file) "
                             "keeps the GGUF's own weights, any other model its own dtype; with an "
                             "explicit --dtype, auto means none. none: float weights. A llama-quantize type ("
                             + ", ".join(gguf_mixtures()) + "): quantize the float weights at load as "
                             "llama-quantize does (its per-tensor mixture and rounding searches; the llama.cpp-"
                             "compatible choice). int8 (per output channel) or int4 (min/max in groups of "
                             "--quant-group-size): our own older schemes, not llama.cpp's")
    parser.add_argument("--quant-group-size", type=int, default=None, metavar="N",
                        help="int4 group size, 32, 64, 128 or 256 (default: 64, or 32 where 64 does not divide "
                             "a layer's inputs); with int8, per group instead of per channel")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPE_NAMES),
                        help="the KV cache's element type. auto (the default): float16 when the weights are "
                             "quantized on CPU (the default model as served: attention reads half the bytes, as "
                             "llama.cpp's default f16 cache), else --dtype. float16 with float32 activations is a "
                             "CPU option; on CUDA the cache holds --dtype")


def quantize_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine keyword arguments of `add_quantize_args`'s options."""
    return dict(quantize=args.quantize, quant_group_size=args.quant_group_size, kv_cache_dtype=args.kv_cache_dtype)


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding's options (`llmengine serve` and `llmengine generate`)."""
    parser.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                        help="serve chat's tool_choice 'auto' (OpenAI's default with tools): read the model's "
                             "<tool_call>{json}</tool_call> blocks (hermes: Qwen2.5, Hermes and others) as tool calls")
    parser.add_argument("--speculative", default=None, metavar="ngram|MODEL",
                        help="speculative decoding: n-gram proposals from the sequence's own tokens, or a draft model "
                             "(zoo name or folder) sharing the tokenizer; greedy output is unchanged (default: off)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="proposals per sequence and step (default: 4)")
    parser.add_argument("--prompt-lookup-min", type=int, default=1, metavar="N",
                        help="n-gram: the shortest pattern matched (default: 1)")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, metavar="N",
                        help="n-gram: the longest pattern matched (default: 4)")


def speculative_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine keyword arguments of `add_speculative_args`'s options."""
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max)


def model_specs(args: list[str]) -> list[tuple[str, str, dict[str, Path]]]:
    """`--model` values -> (served name, what to resolve, NAME=PATH mapping)."""
    specs = []
    for text in args or [DEFAULT_MODEL]:
        name, mapping = parse_model_arg(text)
        if mapping:
            specs.append((name, name, mapping))
        else:
            served = Path(text).name if Path(text).expanduser().is_dir() else text
            specs.append((served, text, {}))
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models would be served under one name: {names}")
    return specs


def banner(host: str, port: int, names: list[str], api_key: str | None) -> str:
    shown = "[::1]" if host == "::" else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    base = f"http://{shown}:{port}"
    auth = f" -u {api_key}:" if api_key else ""
    env = f"SCALE_API_KEY={api_key} " if api_key else ""
    name = names[0]
    return "\n".join([
        f"llmengine: serving {', '.join(names)} at {base}",
        "  curl:",
        f"    curl{auth} -X POST '{base}/v1/llm/completions-sync?model_endpoint_name={name}' "
        f"-H 'Content-Type: application/json' -d '{{\"prompt\": \"Suggest a name for an icecream shop\", "
        f"\"max_new_tokens\": 32, \"temperature\": 0}}'",
        "  SDK:",
        f"    {env}LLM_ENGINE_BASE_PATH={base}/ python -c \"from llmengine import Completion; "
        f"print(Completion.create(model='{name}', prompt='Suggest a name for an icecream shop', "
        f"max_new_tokens=32, temperature=0).output.text)\"",
        f"  OpenAI: OpenAI(base_url='{base}/v1', api_key='{api_key or 'none'}')"
        f".completions.create(model='{name}', prompt='...')",
    ])


def run_serve(args: argparse.Namespace) -> int:
    from llmengine_runtime.models.zoo import resolve_model  # heavy imports only once we really serve
    from llmengine_runtime.runtime import AsyncEngine

    specs = model_specs(args.model)
    api_key = args.api_key or os.environ.get("LLMENGINE_API_KEY") or None

    def load_engines() -> dict[str, Any]:
        engines = {}
        for name, ref, mapping in specs:
            folder = resolve_model(ref, mapping)
            logs.log.info("loading %s from %s", name, folder)
            started = time.perf_counter()
            engines[name] = AsyncEngine(folder, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, name=name,
                                        compile=args.compile, enable_prefix_caching=args.prefix_caching,
                                        deterministic=args.deterministic,
                                        progress=True,  # a tqdm bar over the weights on stderr
                                        tensor_parallel_size=args.tensor_parallel_size, cpu_threads=args.threads,
                                        **speculative_kwargs(args), **quantize_kwargs(args))
            logs.model_loaded(name, engines[name], time.perf_counter() - started, warmed_up=args.compile)
            logs.log.info("%s weights: %s", name, engines[name].engine.model.quantization or "float")
        return engines

    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"llmengine serve: warning: no API key, and {args.host} is reachable from other "
                         "machines; anyone who can reach it can use it (set --api-key or LLMENGINE_API_KEY)\n")

    def load_at_run_time(name: str, folder: Path, max_model_len: int | None) -> Any:  # Model.create
        logs.log.info("loading %s from %s (Model.create)", name, folder)
        return AsyncEngine(folder, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, name=name, compile=args.compile,
                           enable_prefix_caching=args.prefix_caching, max_model_len=max_model_len,
                           deterministic=args.deterministic,
                           cpu_threads=args.threads, **quantize_kwargs(args))

    app = create_app(load_engines, api_key=api_key, max_queue=args.max_queue, batch_dir=args.batch_dir,
                     models_dir=args.models_dir, engine_factory=load_at_run_time,
                     tool_call_parser=args.tool_call_parser)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=3, timeout_keep_alive=30)
    logs.configure("info")  # our lines (server/logs.py) in uvicorn's format, beside its own
    server = GracefulServer(config)
    state = app.state.server

    def announce() -> None:  # once the port is open and the models are loaded (or failed to)
        while not server.should_exit and not (server.started and (state.ready or state.load_error)):
            time.sleep(0.05)
        if state.load_error:
            print(f"llmengine serve: error: {state.load_error}", file=sys.stderr, flush=True)
            server.should_exit = True
        elif state.ready:
            print(banner(args.host, args.port, list(state.engines), api_key), flush=True)

    threading.Thread(target=announce, name="llmengine-announce", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a clean shutdown
        pass
    return 1 if state.load_error or not server.started else 0
