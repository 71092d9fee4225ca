"""Speculative decoding benchmark: the same engine with and without speculation, in one run, on two workloads.

    python -m llmengine_runtime.benchmarks.decode --speculative ngram --dtype float32 --threads 2
    python -m llmengine_runtime.benchmarks.decode --speculative ngram --num-speculative-tokens 6 --batch-sizes 1 4
    python -m llmengine_runtime.benchmarks.decode --speculative PATH_OR_ZOO_NAME
        # a draft model sharing the tokenizer

Workloads (chat prompts when the model has a chat template, greedy, stopping at eos or --max-new-tokens):
- input-grounded: the answer repeats or edits text of the prompt (rename a variable in code, document a class,
  fix typos, extend a table), where proposals copied from the prompt are often right;
- free generation: stories and explanations, where they rarely are.

One engine serves both sides: plain decoding is the same requests with `speculate=False`. Each repeat runs the
plain side and then the speculative side on every batch of the workload (batch 1: each prompt alone, one after
another; batch 4: the four prompts together), so both see the same machine load. Reported per workload and
batch size, median (min-max) over the repeats: tok/s = output tokens / wall time of the generate calls
(prefill included), the speculative/plain ratio of each repeat, the acceptance rate (accepted / proposed
tokens), the mean accepted length (accepted proposals per speculating sequence-step) and the tokens per step.
Greedy outputs must be token-identical with and without speculation: every prompt is checked and the result
reported.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import machine_info, spread
from llmengine_runtime.benchmarks.report import publish, speculative_markdown, speculative_plot

CODE = """def total_price(items, tax):
    x = 0
    for item in items:
        x += item.price * item.quantity
    x = x * (1 + tax)
    return round(x, 2)
"""
CLASS = """class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        if name in self.items:
            self.items[name] += count
        else:
            self.items[name] = count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise ValueError("not enough " + name)
        self.items[name] -= count
"""
STORY = ("The quick brown fox jumpd over the lazy dog. It was a sunny day and the fox was very hapy. After "
         "jumping, the fox ran into the forrest to find its family. The family was waiting near the old oak tre.")
WORKLOADS = {
    "input-grounded": [
        f"Rewrite this code with the variable x renamed to subtotal. Output only the code.\n```python\n{CODE}```",
        f"Add a docstring to each method of this class. Output only the code.\n```python\n{CLASS}```",
        f"Fix the spelling mistakes in this text and output the corrected text:\n{STORY}",
        "Add a column country to this Markdown table:\n| name | city |\n| --- | --- |\n| Alice | Paris |\n"
        "| Bob | London |\n| Carol | Berlin |\n| Dave | Madrid |\n| Erin | Rome |",
    ],
    "free generation": [
        "Write a short story about a robot learning to paint.",
        "Explain how photosynthesis works.",
        "What are the benefits of regular exercise?",
        "Describe a day in the life of a lighthouse keeper.",
    ],
}
SPEC_KEYS = ("spec_proposed_tokens", "spec_accepted_tokens", "spec_steps", "steps")


def encode(tokenizer, text: str, vocab_size: int) -> list[int]:
    """The prompt's ids: in the chat template if the model has one; without a tokenizer (random test weights),
    its UTF-8 bytes modulo the vocabulary."""
    if tokenizer is None:
        return [b % vocab_size for b in text.encode()]
    if tokenizer.has_chat_template:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                                add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=True)


def generate(llm, prompts: list[list[int]], params) -> tuple[float, list[list[int]], dict[str, int]]:
    """Wall seconds, token ids per prompt, and the engine's speculation counters over the call."""
    engine = llm.engine
    before = {key: engine.counters[key] for key in SPEC_KEYS}
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, progress=False)
    seconds = time.perf_counter() - t0
    for r in results:
        if r.error:
            raise RuntimeError(f"request {r.request_id} failed: {r.error}")
    return seconds, [r.token_ids for r in results], {key: engine.counters[key] - before[key] for key in SPEC_KEYS}


def run(args: argparse.Namespace) -> int:
    from llmengine_runtime.benchmarks.random_model import resolve_folder
    from llmengine_runtime.models.loader import resolve_device
    from llmengine_runtime.runtime import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    folder, random_weights = resolve_folder(args)
    batch_sizes = args.batch_sizes or [1, 4]
    params = {mode: SamplingParams(max_new_tokens=args.max_new_tokens, speculate=mode == "speculative")
              for mode in ("plain", "speculative")}
    info = machine_info()
    rows, checks = [], []
    quantize = (args.quantize or ["none"])[0]  # the first weight format asked for (gguf: what `make run` serves)
    for dtype in args.dtype:
        llm = LLM(folder, dtype=dtype, device=str(device), max_num_seqs=max(batch_sizes),
                  quantize=None if quantize == "none" else quantize,
                  kv_cache_gib=args.kv_cache_gib, compile=args.compile, enable_prefix_caching=False,
                  speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                  prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max)
        workloads = {name: [encode(llm.tokenizer, text, llm.config.vocab_size) for text in texts]
                     for name, texts in WORKLOADS.items()}
        bar = tqdm(total=len(workloads) * len(batch_sizes) * (args.warmup + args.repeats), desc=f"speculative {dtype}",
                   unit="run", disable=args.no_progress)
        for name, prompts in workloads.items():
            for b in batch_sizes:
                groups = [prompts[i:i + b] for i in range(0, len(prompts), b)]
                runs: dict[str, list[dict]] = {"plain": [], "speculative": []}
                outputs: dict[str, list[list[int]]] = {}
                for i in range(args.warmup + args.repeats):
                    for mode in ("plain", "speculative"):
                        seconds, tokens, counts = 0.0, [], dict.fromkeys(SPEC_KEYS, 0)
                        for group in groups:
                            s, t, c = generate(llm, group, params[mode])
                            seconds, tokens = seconds + s, tokens + t
                            counts = {key: counts[key] + c[key] for key in SPEC_KEYS}
                        outputs.setdefault(mode, tokens)
                        if i >= args.warmup:
                            runs[mode].append({"seconds": seconds, "tokens": sum(map(len, tokens)), **counts})
                    bar.update(1)
                rows.append(summarize(dtype, name, b, runs))
                checks += compare(dtype, name, b, outputs["plain"], outputs["speculative"])
        bar.close()
        llm = None
    report = {"benchmark": "decode-speculative", "machine": info, "model": args.model, "folder": str(folder),
              "quantize": quantize,
              "random_weights": random_weights,
              "device": str(device), "speculative": args.speculative, "num_speculative_tokens":
              args.num_speculative_tokens, "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max],
              "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "repeats": args.repeats,
              "workloads": WORKLOADS, "rows": rows, "greedy_check": checks}
    if args.name == "decode":
        args.name = "decode-speculative"
    publish(report, speculative_markdown(report), speculative_plot, args,
            f"speculative decoding: {args.model}, {args.speculative}")
    return 0 if all(c["match"] for c in checks) else 1


def summarize(dtype: str, workload: str, batch_size: int, runs: dict[str, list[dict]]) -> dict:
    tok_s = {mode: [r["tokens"] / r["seconds"] for r in rs] for mode, rs in runs.items()}
    spec = runs["speculative"][0]  # greedy: every repeat proposes and accepts the same tokens
    return {
        "dtype": dtype, "workload": workload, "batch_size": batch_size, "output_tokens": spec["tokens"],
        "plain_tok_s": spread(tok_s["plain"]), "spec_tok_s": spread(tok_s["speculative"]),
        "speedup": spread([s / p for s, p in zip(tok_s["speculative"], tok_s["plain"])]),
        "speedup_of_medians": spread(tok_s["speculative"])["median"] / spread(tok_s["plain"])["median"],
        "proposed": spec["spec_proposed_tokens"], "accepted": spec["spec_accepted_tokens"],
        "spec_steps": spec["spec_steps"],
        "acceptance_rate": spec["spec_accepted_tokens"] / spec["spec_proposed_tokens"]
        if spec["spec_proposed_tokens"] else float("nan"),
        "mean_accepted_length": spec["spec_accepted_tokens"] / spec["spec_steps"] if spec["spec_steps"] else 0.0,
        "steps": {"plain": runs["plain"][0]["steps"], "speculative": spec["steps"]},
    }


def compare(dtype: str, workload: str, batch_size: int, plain: list[list[int]], spec: list[list[int]]) -> list[dict]:
    """Greedy tokens with vs without speculation, per prompt."""
    checks = []
    for row, (a, b) in enumerate(zip(plain, spec)):
        mismatch = next((i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i]), None)
        checks.append({"dtype": dtype, "workload": workload, "batch_size": batch_size, "row": row,
                       "match": mismatch is None, "first_mismatch": mismatch, "tokens": len(a)})
    return checks
