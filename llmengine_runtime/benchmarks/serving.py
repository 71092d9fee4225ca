"""Serving benchmark against a running server, in the manner of vLLM's benchmark_serving.

    python -m llmengine_runtime.benchmarks.serving --launch
        # starts a server, 1 vs 16 concurrent streams
    python -m llmengine_runtime.benchmarks.serving --base-url http://127.0.0.1:5005 --request-rate 2 4 --num-prompts 64
    python -m llmengine_runtime.benchmarks.serving --concurrency 1 4 16 --input-len 64:256 --output-len 128

Requests stream from /v1/llm/completions-stream (or /v1/completions with --api openai) with synthetic prompts
of about --input-len words (one token each, roughly) and a fixed --max-new-tokens (or a uniform range). Arrivals
are all at once (each --concurrency level is a run with at most that many requests in flight) or a Poisson
process at --request-rate requests/s. Per run: TTFT, TPOT ((latency - TTFT) / (tokens - 1)), inter-token
latency (gaps between chunks) and end-to-end latency at p50/p90/p99, request and output token throughput. When
the first run is a single stream, every run's output tok/s is also given as a multiple of it.

With --baseline-url (or --launch-baseline "COMMAND", see serving_baseline.py) every level also runs, with the same
requests, against a second server on the OpenAI route, right after ours (ours c=1, baseline c=1, ours c=16, ...):
the report then holds both sides, each one's scaling vs its own single stream, and ours/baseline ratios per level.

    python -m llmengine_runtime.benchmarks.serving --launch --api openai --concurrency 1 16 64 \
        --baseline-name "vLLM CPU 0.32" --launch-baseline "VLLM_CPU_KVCACHE_SPACE=2 .cache/vllm-venv/bin/python \
        -m vllm.entrypoints.openai.api_server --model FOLDER --dtype bfloat16 --max-model-len 2048 --port {port}"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, parse_range
from llmengine_runtime.benchmarks.report import publish, serving_markdown, serving_plot, serving_report
from llmengine_runtime.benchmarks.serving_baseline import (
    add_baseline_args,
    baseline_args,
    launch_baseline,
    served_model,
    stop_baseline,
    wait_baseline_ready,
)
from llmengine_runtime.benchmarks.serving_client import (  # noqa: F401 (re-exported: the other benchmarks' client)
    WORDS,
    RequestResult,
    compute_metrics,
    make_requests,
    run_load,
    send_llm,
    send_openai,
)
from llmengine_runtime.benchmarks.serving_compare import add_baseline, compare_markdown, compare_plot

SERVER_COMMAND = [sys.executable, "-m", "llmengine_runtime.cli", "serve"]  # what --launch runs


# -- the server ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url.rstrip("/") + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}/readyz not ready after {timeout:.0f} s")
        time.sleep(0.5)


def launch_server(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    port = args.port or free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    command = [*SERVER_COMMAND, "--port", str(port), "--model", args.model, *shlex.split(args.server_args)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"launching: {shlex.join(command)} (log: {log_path})", file=sys.stderr)
    with log_path.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the benchmark ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Start what --launch and --launch-baseline ask for, wait until both servers are ready, run the benchmark,
    and stop what was started."""
    out_dir = Path(args.out_dir)
    proc = baseline_proc = None
    try:
        if args.launch_baseline:
            port = free_port() if "{port}" in args.launch_baseline else None
            if port is not None and not args.baseline_url:
                args.baseline_url = f"http://127.0.0.1:{port}"
            if not args.baseline_url:
                raise RuntimeError("--launch-baseline needs {port} in its command or a --baseline-url")
            baseline_proc = launch_baseline(args, out_dir / f"{args.name}-baseline.log", port or 0)
        proc = launch_server(args, out_dir / f"{args.name}-server.log") if args.launch else None
        wait_ready(args.base_url, args.launch_timeout if proc else 2, proc)
        baseline = None
        if args.baseline_url:
            wait_baseline_ready(args.baseline_url, args.baseline_launch_timeout if baseline_proc else 2, baseline_proc)
            model = args.baseline_model or served_model(args.baseline_url) or args.model
            baseline = baseline_args(args, model)
        return benchmark(args, out_dir, baseline)
    except (RuntimeError, ValueError) as e:
        print(f"serving benchmark: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
        if baseline_proc is not None:
            stop_baseline(baseline_proc)


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """One spec per level: a concurrency (all requests at once) or a Poisson rate, with its number of prompts."""
    if args.request_rate:
        runs = [{"request_rate": None if r == float("inf") else r, "concurrency": args.max_concurrency}
                for r in args.request_rate]
    else:
        runs = [{"request_rate": None, "concurrency": c} for c in args.concurrency]
    for spec in runs:
        spec["num_prompts"] = args.num_prompts or max(args.min_prompts, 2 * (spec["concurrency"] or 8))
    return runs


def benchmark(args: argparse.Namespace, out_dir: Path, baseline: argparse.Namespace | None = None) -> int:
    """Every level against our server and then, with the same requests, against the baseline (ours level 1,
    baseline level 1, ours level 16, ...); the report of ours, or of both side by side."""
    input_len, output_len = parse_range(args.input_len), parse_range(args.max_new_tokens)
    sides = [(args, plan_runs(args))] + ([(baseline, plan_runs(args))] if baseline else [])
    if args.warmup:
        warm = make_requests(args.warmup, input_len, (8, 8), args.seed + 1)
        for side, _ in sides:
            asyncio.run(run_load(side, warm, args.warmup, None))
    total = sum(s["num_prompts"] for _, runs in sides for s in runs)
    bar = tqdm(total=total, desc="serving", unit="req", disable=args.no_progress)
    for i, specs in enumerate(zip(*(runs for _, runs in sides))):
        requests = make_requests(specs[0]["num_prompts"], input_len, output_len, args.seed + 100 * i)
        for (side, _), spec in zip(sides, specs):
            name = args.baseline_name if side is baseline else args.ours_name
            bar.set_description(f"serving {name} c={spec['concurrency']} rate={spec['request_rate'] or 'inf'}")
            results, duration = asyncio.run(run_load(side, requests, spec["concurrency"], spec["request_rate"], bar))
            spec.update(compute_metrics(results, duration))
    bar.close()
    report = serving_report(args, sides[0][1])
    if baseline is None:
        publish(report, serving_markdown(report), serving_plot, args, f"serving: {args.model}")
    else:
        add_baseline(report, args, baseline, sides[1][1])
        publish(report, compare_markdown(report), compare_plot, args,
                f"serving: {args.model} ({args.ours_name}) vs {args.baseline_name}")
    return 0 if all(s["failed"] == 0 for _, runs in sides for s in runs) else 1


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:5005")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model endpoint name (default: %(default)s)")
    parser.add_argument("--api", choices=["llm", "openai"], default="llm",
                        help="llm: /v1/llm/completions-stream; openai: /v1/completions with stream=true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16],
                        help="one run per value, requests all sent at once with at most this many in flight")
    parser.add_argument("--request-rate", type=float, nargs="+", default=None,
                        help="instead: one run per Poisson arrival rate (req/s; inf = all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="cap on requests in flight with --request-rate")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per run (default: twice the concurrency, at least --min-prompts)")
    parser.add_argument("--min-prompts", type=int, default=4)
    parser.add_argument("--input-len", default="128", help="prompt words: N or LO:HI (uniform)")
    parser.add_argument("--max-new-tokens", "--output-len", default="128", help="N or LO:HI (uniform)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send ignore_eos (servers that do not know it ignore it; actual tokens are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="short requests sent before the runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launch", action="store_true", help="start `llmengine serve` and stop it after")
    parser.add_argument("--port", type=int, default=None, help="with --launch (default: a free port)")
    parser.add_argument("--server-args", default="", help="extra arguments for the launched server, one string")
    parser.add_argument("--launch-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="serving", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ours-name", default="llmengine", help="our server's name in a side-by-side report")
    add_baseline_args(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
