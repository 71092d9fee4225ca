"""Batch-1 decode beside a busy neighbour process: fixed thread counts against the engine's thread tuner.

    python -m llmengine_runtime.benchmarks.neighbour
        # default model (its GGUF int4), 128 tokens, 3 repeats
    python -m llmengine_runtime.benchmarks.neighbour --threads 1 2 auto --neighbours 0 1

For each number of neighbours (processes that spin on one core each, started before and stopped after) and each
threads setting (N fixed, or `auto`: runtime/thread_tuner.py), one engine generates `--max-new-tokens` greedy
tokens `--repeats` times after a warm-up. Reported: decode tok/s, median (min-max), and its share of the idle
speed of the best fixed setting, measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch
from tqdm import tqdm

from llmengine_runtime.benchmarks.common import OUT_DIR, machine_info, spread
from llmengine_runtime.benchmarks.report import new_figure, publish, save_figure


def spin() -> None:
    while True:
        pass


def decode_rate(llm, params, repeats: int) -> list[float]:
    vocab = llm.config.vocab_size
    prompt = [[1] + [(7 * i + 100) % vocab for i in range(16)]]
    llm.generate(prompt, params, progress=False)  # warm-up (and, with auto, the tuner's first trial)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        [result] = llm.generate(prompt, params, progress=False)
        rates.append(len(result.token_ids) / (time.perf_counter() - start))
    return rates


def run(args: argparse.Namespace) -> dict:
    from llmengine_runtime.runtime import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    max_threads = torch.get_num_threads()
    rows = []
    bar = tqdm(total=len(args.neighbours) * len(args.threads), desc="neighbour", disable=args.no_progress)
    for neighbours in args.neighbours:
        procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(neighbours)]
        for p in procs:
            p.start()
        try:
            for threads in args.threads:
                torch.set_num_threads(max_threads)
                cpu_threads = threads if threads == "auto" else int(threads)
                llm = LLM(args.model, quantize=args.quantize, cpu_threads=cpu_threads)
                rates = decode_rate(llm, params, args.repeats)
                tuner = llm.engine.thread_tuner
                rows.append({"neighbours": neighbours, "threads": threads, "tok_s": spread(rates),
                             "tuned_to": tuner.threads if tuner else None})
                del llm
                bar.update(1)
        finally:
            for p in procs:
                p.terminate()
    bar.close()
    idle = max((r["tok_s"]["median"] for r in rows if r["neighbours"] == 0 and r["threads"] != "auto"),
               default=float("nan"))
    for r in rows:
        r["share_of_idle"] = r["tok_s"]["median"] / idle
    return {"benchmark": "neighbour", "machine": machine_info(), "model": args.model, "quantize": args.quantize,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "max_threads": max_threads,
            "idle_tok_s": idle, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"Batch-1 decode beside busy neighbours: {report['model']} ({report['quantize']}), "
             f"{report['max_new_tokens']} tokens, median (min-max) of {report['repeats']}; share = of the best fixed "
             f"setting's idle speed ({report['idle_tok_s']:.1f} tok/s), same run.", "",
             "| neighbours | threads | decode tok/s | share of idle | tuner chose |", "| --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        s = r["tok_s"]
        lines.append(f"| {r['neighbours']} | {r['threads']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                     f"{100 * r['share_of_idle']:.0f}% | {r['tuned_to'] if r['tuned_to'] else '-'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path):
    plt, fig, ax = new_figure(1, (6, 3.5))
    for threads in dict.fromkeys(r["threads"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["threads"] == threads]
        ax.plot([r["neighbours"] for r in rows], [r["tok_s"]["median"] for r in rows], marker="o",
                label=f"threads {threads}")
    ax.set_xlabel("busy neighbour processes")
    ax.set_ylabel("decode tok/s")
    ax.legend()
    return save_figure(plt, fig, "Decode beside busy neighbours", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantize", default="auto", help="as llmengine serve's --quantize (default: auto)")
    parser.add_argument("--threads", nargs="+", default=["2", "1", "auto"], help="fixed counts and/or auto")
    parser.add_argument("--neighbours", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="neighbour")
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    publish(report, markdown(report), plot, args, "Decode beside busy neighbours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
