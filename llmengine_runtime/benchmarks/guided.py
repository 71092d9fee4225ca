"""Guided decoding's cost per engine step: the same batch with and without a guided half, on one engine.

    python -m llmengine_runtime.benchmarks.guided --threads 1 --batch-sizes 1 16 --repeats 3

Batch B: B prompts decoded together, greedy, `--max-new-tokens` each. Unguided: every request free (ignore_eos,
so each runs to the end). Guided: the first ceil(B/2) follow a JSON schema whose string must be at least 400
characters long (so none finishes early; JSON masks cost the most of the kinds), the rest as before. Reported
per batch size, median (min-max) over the repeats of the median decode-step time (steps where all B are
decoding), and the time of the mask itself (computing the bitmasks and applying them) per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmengine_runtime.runtime.engine as engine_module
from llmengine_runtime.benchmarks.common import machine_info
from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine

SCHEMA = {"type": "object", "required": ["story"], "additionalProperties": False,
          "properties": {"story": {"type": "string", "minLength": 400}}}
PROMPTS = ["Write a story about a fox, as JSON:", "A short story about the sea, as JSON:",
           "Tell a tale of a brave knight, as JSON:", "A story about a robot learning to paint, as JSON:"]


def decode_steps(engine: Engine, batch: int, guided: int, max_new_tokens: int) -> tuple[list[float], list[float]]:
    """Per decode step with all `batch` requests decoding: the step's wall time and the mask's (seconds)."""
    for i in range(batch):
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=i >= guided, speculate=False,
                                guided=("json", SCHEMA) if i < guided else None)
        engine.add_request(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), params)
    steps, masks = [], []
    mask_time = [0.0]
    original = engine_module.apply_token_masks

    def timed(*args, **kwargs):
        start = time.perf_counter()
        original(*args, **kwargs)
        mask_time[0] += time.perf_counter() - start

    engine_module.apply_token_masks = timed
    try:
        while engine.has_unfinished():
            decoding = all(seq.num_computed_tokens == seq.num_tokens - 1 for seq in engine.requests.values())
            full = len(engine.requests) == batch
            mask_time[0] = 0.0
            start = time.perf_counter()
            engine.step()
            if decoding and full:
                steps.append(time.perf_counter() - start)
                masks.append(mask_time[0])
    finally:
        engine_module.apply_token_masks = original
    return steps, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(args.model, device=args.device, dtype=args.dtype, kv_cache_gib=0.5, enable_prefix_caching=False)
    decode_steps(engine, 1, 1, 4)  # builds the tokenizer's llguidance view and compiles the schema once
    print(machine_info())
    print("| batch | guided | step ms, unguided | step ms, half guided | overhead | mask ms per step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        guided = (batch + 1) // 2
        plain_runs, guided_runs, mask_runs = [], [], []
        for _ in range(args.repeats):
            plain_runs.append(statistics.median(decode_steps(engine, batch, 0, args.max_new_tokens)[0]) * 1e3)
            steps, masks = decode_steps(engine, batch, guided, args.max_new_tokens)
            guided_runs.append(statistics.median(steps) * 1e3)
            mask_runs.append(statistics.median(masks) * 1e3)

        def show(values: list[float]) -> str:
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        overhead = statistics.median(g / p - 1 for g, p in zip(guided_runs, plain_runs)) * 100
        print(f"| {batch} | {guided} | {show(plain_runs)} | {show(guided_runs)} | {overhead:+.1f}% | "
              f"{show(mask_runs)} |", flush=True)


if __name__ == "__main__":
    main()
