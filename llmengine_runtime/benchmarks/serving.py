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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, distribution, parse_range
from llmengine_runtime.benchmarks.report import publish, serving_markdown, serving_plot, serving_report

WORDS = ("the of and to in is was for on that with as by at from his her an which or this are be had it not "
         "they one all were but we there been have when their who will more no if out so said what up its about "
         "into than them can only other new some could time these two may first then do any like my now over "
         "such our man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own "
         "see men work long here get both between life being under never day same another know while last").split()


SERVER_COMMAND = [sys.executable, "-m", "llmengine_runtime.cli", "serve"]  # what --launch runs


@dataclass
class RequestResult:
    ok: bool = False
    start: float = 0.0
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that brought new tokens
    error: str | None = None


def compute_metrics(results: list[RequestResult], duration: float) -> dict:
    """Latency distributions (ms) and throughputs of one run; failed requests count only as failed."""
    ok = [r for r in results if r.ok and r.chunk_times]
    ttft = [r.chunk_times[0] - r.start for r in ok]
    tpot = [(r.end - r.chunk_times[0]) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.end - r.start for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    ms = lambda xs: {k: v * 1e3 for k, v in distribution(xs).items()}
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_output_tokens": output_tokens, "total_prompt_tokens": prompt_tokens,
        "mean_output_tokens": output_tokens / len(ok) if ok else 0.0,
        "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(itl), "e2e_ms": ms(e2e),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def make_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int) -> list[tuple[str, int]]:
    """n (prompt, max_new_tokens): prompts of random common words, lengths uniform in the given ranges."""
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*input_len))), rng.randint(*output_len))
            for _ in range(n)]


async def send_llm(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int,
                   args: argparse.Namespace) -> RequestResult:
    """One streamed request on the LLM Engine API: one `data:` event per chunk, tokens counted by the server."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0, "stop_sequences": None,
            "return_token_log_probs": False, "ignore_eos": args.ignore_eos}  # unknown fields are ignored
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, params={"model_endpoint_name": args.model}, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                out = chunk["output"]
                count = out.get("num_completion_tokens") or 0
                if count > result.output_tokens:
                    result.chunk_times.append(time.perf_counter())
                    result.output_tokens = count
                result.prompt_tokens = out.get("num_prompt_tokens") or result.prompt_tokens
                result.ok = bool(out.get("finished")) or result.ok
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    if not result.ok and result.error is None:
        result.error = "stream ended without a finished chunk"
    return result


async def send_openai(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int,
                      args: argparse.Namespace) -> RequestResult:
    """One streamed request on /v1/completions: a chunk per text delta, exact counts from the usage chunk."""
    body = {"model": args.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else None
                if data == "[DONE]":
                    result.ok = True
                elif data:
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                        return result
                    if any(c.get("text") for c in chunk.get("choices") or []):
                        result.chunk_times.append(time.perf_counter())
                        result.output_tokens += 1
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    if not result.ok and result.error is None:
        result.error = "stream ended without [DONE]"
    return result


async def run_load(args: argparse.Namespace, requests: list[tuple[str, int]], concurrency: int | None,
                   rate: float | None, bar: tqdm | None = None) -> tuple[list[RequestResult], float]:
    """Send every request (Poisson arrivals at `rate`/s, or all at once when None), at most `concurrency`
    in flight; returns the results in order and the wall time from the first send to the last answer."""
    send = send_openai if args.api == "openai" else send_llm
    url = args.base_url.rstrip("/") + ("/v1/completions" if args.api == "openai" else "/v1/llm/completions-stream")
    headers = {"x-api-key": args.api_key} if args.api_key else {}
    auth = (args.api_key, "") if args.api_key else None
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), headers=headers, auth=auth,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:

        async def one(prompt: str, max_new_tokens: int) -> RequestResult:
            if limit is None:
                result = await send(client, url, prompt, max_new_tokens, args)
            else:
                async with limit:
                    result = await send(client, url, prompt, max_new_tokens, args)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for i, (prompt, max_new_tokens) in enumerate(requests):
            if i and rate:
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(one(prompt, max_new_tokens)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


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
    out_dir = Path(args.out_dir)
    proc = launch_server(args, out_dir / f"{args.name}-server.log") if args.launch else None
    try:
        wait_ready(args.base_url, args.launch_timeout if proc else 2, proc)
        return benchmark(args, out_dir)
    except RuntimeError as e:
        print(f"serving benchmark: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)


def benchmark(args: argparse.Namespace, out_dir: Path) -> int:
    input_len, output_len = parse_range(args.input_len), parse_range(args.max_new_tokens)
    if args.request_rate:
        runs = [{"request_rate": None if r == float("inf") else r, "concurrency": args.max_concurrency}
                for r in args.request_rate]
    else:
        runs = [{"request_rate": None, "concurrency": c} for c in args.concurrency]
    for spec in runs:
        spec["num_prompts"] = args.num_prompts or max(args.min_prompts, 2 * (spec["concurrency"] or 8))
    if args.warmup:
        warm = make_requests(args.warmup, input_len, (8, 8), args.seed + 1)
        asyncio.run(run_load(args, warm, args.warmup, None))
    bar = tqdm(total=sum(s["num_prompts"] for s in runs), desc="serving", unit="req", disable=args.no_progress)
    for i, spec in enumerate(runs):
        bar.set_description(f"serving c={spec['concurrency']} rate={spec['request_rate'] or 'inf'}")
        requests = make_requests(spec["num_prompts"], input_len, output_len, args.seed + 100 * i)
        results, duration = asyncio.run(run_load(args, requests, spec["concurrency"], spec["request_rate"], bar))
        spec.update(compute_metrics(results, duration))
    bar.close()
    report = serving_report(args, runs)
    publish(report, serving_markdown(report), serving_plot, args, f"serving: {args.model}")
    return 0 if all(s["failed"] == 0 for s in runs) else 1


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
