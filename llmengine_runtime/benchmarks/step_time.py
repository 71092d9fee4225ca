"""Where a decode step's time goes (batch 1, or --batch N): the weight products against everything else.

    python -m llmengine_runtime.benchmarks.step_time
        # the default model as served (its GGUF int4), 2 threads
    python -m llmengine_runtime.benchmarks.step_time --threads 1 --steps 256

One engine decodes `--steps` greedy tokens of one sequence after a warm-up, `--repeats` times. Each engine step is
timed whole, and inside it: the model runner's step (its inputs, the forward, the head's product), the sampler;
inside the forward, when the one-call decode step runs it (models/fused_decode.py, with the head when that is
quantized too), the C++ timers of kernels/cpu/step_profile.h split it into the weight products (with their
activation quantization), the head, attention, norms, rotary, KV store and activation.
"Outside the products" is the step minus the layers' products and the head: what a leaner engine could remove.
Reported per token in ms, the median (min-max) over the repeats.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, machine_info, spread
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure
from llmengine_runtime.runtime.step import StepBuffers

KERNEL_PARTS = ["norms", "products", "rotary", "store_kv", "attention", "activation", "head_kernel"]  # step_profile.h


def timed(fn, totals: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def kernel_profile(enable: bool) -> dict[str, float] | None:
    """The fused step's C++ timers since the last call (seconds per part, and the step count), or None."""
    op = getattr(getattr(torch.ops, "llmengine_cpu", None), "decode_step_profile", None)
    if op is None:
        return None
    seconds = op(enable).tolist()
    return dict(zip(KERNEL_PARTS + ["fused_step", "fused_steps"], seconds))


def one_repeat(engine, prompts: list[list[int]], params, steps: int) -> dict[str, float]:
    """Per-step ms of each part over the decode steps of len(prompts) sequences (their prefill steps not
    counted)."""
    totals: dict[str, float] = {}
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill
    while engine.stats()["num_waiting"]:
        engine.step()
    model, runner = engine.model, engine.runner
    runner.run_scored = timed(runner.run_scored, totals, "model")
    fill = StepBuffers.fill  # the step's inputs, whichever executor runs it
    StepBuffers.fill = timed(fill, totals, "inputs")
    model.compute_logits = timed(model.compute_logits, totals, "head")
    engine.sampler.sample = timed(engine.sampler.sample, totals, "sampler")
    kernel_profile(True)
    try:
        n = 0
        start = time.perf_counter()
        while engine.has_unfinished() and n < steps:
            engine.step()
            n += 1
        totals["step"] = time.perf_counter() - start
    finally:
        del runner.run_scored, model.compute_logits, engine.sampler.sample
        StepBuffers.fill = fill
        kernels = kernel_profile(False)
    while engine.has_unfinished():
        engine.step()
    if kernels and kernels["fused_steps"] == n:
        totals.update({k: v for k, v in kernels.items() if k != "fused_steps"})
    ms = {k: 1e3 * v / n for k, v in totals.items()}
    head_python = ms.get("head", 0.0)  # the head's call from Python, when the fused step did not run it
    ms["forward"] = ms["model"] - ms["inputs"] - head_python
    ms["head"] = head_python + ms.get("head_kernel", 0.0)
    ms["engine_rest"] = ms["step"] - ms["model"] - ms["sampler"]
    if "fused_step" in ms:
        ms["forward_python"] = ms["forward"] - ms["fused_step"]
        ms["kernels_rest"] = ms["fused_step"] - sum(ms[p] for p in KERNEL_PARTS)
        ms["outside_products"] = ms["step"] - ms["products"] - ms["head"]
    return ms


def run(args: argparse.Namespace) -> dict:
    from llmengine_runtime.runtime import Engine, SamplingParams

    engine = Engine(args.model, quantize=args.quantize, cpu_threads=args.threads, enable_prefix_caching=False,
                    kv_cache_dtype=args.kv_cache_dtype)
    vocab = engine.model.config.vocab_size
    prompts = [[1] + [(7 * i + 100 + b) % vocab for i in range(args.prompt_len - 1)] for b in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
    one_repeat(engine, prompts, params, min(args.steps, 16))  # warm-up
    runs = [one_repeat(engine, prompts, params, args.steps)
            for _ in tqdm(range(args.repeats), desc="step_time", disable=args.no_progress)]
    parts = {key: spread([r[key] for r in runs]) for key in runs[0]}
    return {"benchmark": "step_time", "machine": machine_info(), "model": args.model, "quantize": args.quantize,
            "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
            "threads": args.threads, "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
            "repeats": args.repeats,
            "fused": "fused_step" in runs[0], "parts": parts}


ROWS = [("step", "engine step (per token)"), ("model", "  model runner step"), ("inputs", "    input tensors"),
        ("forward", "    model forward (with the head when fused)"),
        ("forward_python", "      Python around the fused call"), ("fused_step", "      fused C++ step"),
        ("products", "        weight products (+ activation quantization)"), ("attention", "        attention"),
        ("norms", "        RMSNorms"), ("rotary", "        rotary"), ("store_kv", "        KV store"),
        ("activation", "        SiLU-and-mul"), ("head_kernel", "        head product and argmax"),
        ("kernels_rest", "        rest of the C++ step"),
        ("head", "  head product (logits), in the fused step or not"), ("sampler", "  sampler"),
        ("engine_rest", "  engine rest (scheduler, detokenizer, outputs)"),
        ("outside_products", "outside the products (step - products - head)")]


def markdown(report: dict) -> str:
    unit = "token" if report.get("batch", 1) == 1 else "step"
    lines = [f"Batch-{report.get('batch', 1)} decode step, {report['model']} ({report['quantize']}, "
             f"{report.get('kv_cache_dtype')} KV "
             f"cache), {report['threads']} threads, "
             f"{report['prompt_len']}-token prompts, {report['steps']} steps; ms per {unit}, median (min-max) of "
             f"{report['repeats']}" + ("" if report["fused"] else "; the one-call decode step did not apply"), "",
             f"| part | ms per {unit} |", "| --- | --- |"]
    for key, label in ROWS:
        if key in report["parts"]:
            s = report["parts"][key]
            depth = (len(label) - len(label.lstrip())) // 2
            lines.append(f"| {'. ' * depth}{label.strip()} | "
                         f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path):
    plt, fig, ax = new_figure(1, (7, 3.5))
    parts = report["parts"]
    leaves = [k for k in ["products", "head", "attention", "norms", "rotary", "store_kv", "activation",
                          "kernels_rest", "inputs", "forward_python", "sampler", "engine_rest"] if k in parts]
    if "products" not in parts:
        leaves = [k for k in ["inputs", "forward", "head", "sampler", "engine_rest"] if k in parts]
    left = 0.0
    for key in leaves:
        width = max(parts[key]["median"], 0.0)
        ax.barh([0], [width], left=left, label=key)
        left += width
    ax.set_yticks([])
    ax.set_xlabel("ms per token")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return save_figure(plt, fig, "Where a batch-1 decode step's time goes", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantize", default="auto", help="as llmengine serve's --quantize (default: auto)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="as llmengine serve's (default: auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=17)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="step_time")
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    publish(report, markdown(report), plot, args, "Where a batch-1 decode step's time goes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
