"""The serving benchmark's client: synthetic prompts, one streamed request on either API (LLM Engine's
/v1/llm/completions-stream or OpenAI's /v1/completions), a run of requests at a concurrency or a Poisson rate, and
the run's latency distributions and throughputs."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import distribution

WORDS = ("the of and to in is was for on that with as by at from his her an which or this are be had it not "
         "they one all were but we there been have when their who will more no if out so said what up its about "
         "into than them can only other new some could time these two may first then do any like my now over "
         "such our man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own "
         "see men work long here get both between life being under never day same another know while last").split()


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
