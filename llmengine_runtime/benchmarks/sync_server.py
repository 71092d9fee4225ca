"""Batch-1 decode through the server against llama.cpp on the same GGUF, in one run.

    python -m llmengine_runtime.benchmarks.sync_server
        # what `make run` serves, 2 threads, 128 tokens
    python -m llmengine_runtime.benchmarks.sync_server --threads 1 --repeats 5

Starts `llmengine serve` as `make run` does (plus `--threads`), sends `--repeats` sync requests
(`POST /v1/llm/completions-sync`, greedy, `max_new_tokens` tokens, `ignore_eos`) one at a time after a warm-up, and
stops it; then llama-cpp-python (benchmarks/llamacpp.py) generates as many tokens after the same prompt ids with the
same threads. Reported per engine: request tok/s = tokens / wall time of the whole request (prefill, decode, and for
ours the HTTP round trip), median (min-max), and ours / llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from llmengine_runtime.benchmarks.common import OUT_DIR, machine_info, spread
from llmengine_runtime.benchmarks.decode import DEFAULT_PROMPT
from llmengine_runtime.benchmarks.llamacpp import baseline_gguf, load, run_llamacpp
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure
from llmengine_runtime.benchmarks.serving import launch_server, stop_server, wait_ready
from llmengine_runtime.models.tokenizer import Tokenizer
from llmengine_runtime.models.zoo import DEFAULT_MODEL, resolve_model


def ours(args: argparse.Namespace) -> tuple[list[float], int]:
    """Request tok/s of each timed request, and the server's wait until /readyz answered (s)."""
    server = SimpleNamespace(port=None, model=args.model, server_args=f"--threads {args.threads}", base_url="")
    start = time.perf_counter()
    proc = launch_server(server, Path(args.out_dir) / f"{args.name}-server.log")
    rates = []
    try:
        wait_ready(server.base_url, 600, proc)
        ready = time.perf_counter() - start
        body = {"prompt": DEFAULT_PROMPT, "max_new_tokens": args.max_new_tokens, "temperature": 0.0,
                "ignore_eos": True}
        name = args.model.split("=", 1)[0]  # NAME=PATH serves PATH as NAME
        url = f"{server.base_url}/v1/llm/completions-sync?model_endpoint_name={name}"
        with httpx.Client(timeout=600) as client:
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                response = client.post(url, json=body)
                elapsed = time.perf_counter() - t0
                response.raise_for_status()
                n = response.json()["output"]["num_completion_tokens"]
                if n != args.max_new_tokens:
                    raise RuntimeError(f"the server returned {n} tokens, not {args.max_new_tokens}")
                if i >= args.warmup:
                    rates.append(n / elapsed)
    finally:
        stop_server(proc)
    return rates, ready


def llama_cpp(args: argparse.Namespace) -> list[float]:
    folder = resolve_model(args.model)
    llm = load(baseline_gguf(None, folder), args.threads)
    prompt_ids = Tokenizer.from_folder(folder).encode(DEFAULT_PROMPT)
    rates = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        result = run_llamacpp(llm, prompt_ids, args.max_new_tokens)
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            rates.append(len(result.token_ids) / elapsed)
    return rates


def markdown(report: dict) -> str:
    r = report
    lines = [f"Sync requests, batch 1: {r['model']} as `make run` serves it, {r['max_new_tokens']} tokens, "
             f"{r['threads']} threads, median (min-max) of {r['repeats']} after {r['warmup']} warm-up; request tok/s = "
             f"tokens / whole request (ours: through HTTP). Server ready in {r['ready_s']:.1f} s.", "",
             "| engine | request tok/s | vs llama.cpp |", "| --- | --- | --- |"]
    for name in ("ours (server)", "llama.cpp"):
        s = r["engines"][name]
        lines.append(f"| {name} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                     f"{s['median'] / r['engines']['llama.cpp']['median']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    plt, fig, ax = new_figure(1, (5, 3.2))
    names = list(report["engines"])
    ax.bar(names, [report["engines"][n]["median"] for n in names], color=["tab:blue", "tab:gray"])
    ax.set_ylabel("request tok/s (batch 1)")
    return save_figure(plt, fig, "Sync requests, batch 1", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2, help="for both engines (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="sync_server")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args(argv)
    print("our server ...", file=sys.stderr)
    server_rates, ready = ours(args)
    print("llama.cpp ...", file=sys.stderr)
    baseline = llama_cpp(args)
    report = dict(vars(args), machine=machine_info(), ready_s=ready,
                  engines={"ours (server)": spread(server_rates), "llama.cpp": spread(baseline)},
                  raw={"ours (server)": server_rates, "llama.cpp": baseline})
    publish(report, markdown(report), plot, args, "Sync requests through the server against llama.cpp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
