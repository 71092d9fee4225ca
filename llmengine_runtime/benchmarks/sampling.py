"""Sampling benchmark: the sampler's time per engine step, by sampling rule and rows, ours against the torch path.

    python -m llmengine_runtime.benchmarks.sampling
    python -m llmengine_runtime.benchmarks.sampling --rows 1 16 64 --vocab 49152 --repeats 15

Rows of random logits over the default model's vocabulary, peaked (N(0, 4^2): a few tokens hold most of the mass,
as a language model's usually do) or flat (N(0, 1): a nucleus of tens of thousands of tokens, the worst case), go
through `Sampler.sample` (runtime/sampler.py: kernels/cpu/sample_rows.cpp's truncation and inverse-CDF draw,
greedy_sample for greedy rows) and through the torch path it replaced in the same run (temperature, a sort of each
row for top-k/top-p, log_softmax, `torch.multinomial` per row). Reported: ms per call, median (min-max) of
--repeats, and the ratio. Writes JSON, a Markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from llmengine_runtime.benchmarks.common import OUT_DIR, machine_info, spread
from llmengine_runtime.benchmarks.report import new_figure, publish
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.sampler import Sampler, top_k_top_p_torch

RULES = {"greedy": dict(temperature=0.0), "temperature 0.8": dict(temperature=0.8),
         "temperature 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
         "temperature 1, top_k 50": dict(temperature=1.0, top_k=50)}
LOGITS = {"peaked": 4.0, "flat": 1.0}  # the rows' standard deviation


def torch_path(logits: torch.Tensor, p: SamplingParams) -> list[int]:
    """What the sampler did before kernels/cpu/sample_rows.cpp: one sort a row, then one multinomial a row."""
    if p.greedy:
        return logits.argmax(-1).tolist()
    rows, vocab = logits.shape
    x = logits / p.temperature
    if p.top_k != -1 or p.top_p < 1:
        x = top_k_top_p_torch(x, torch.full((rows,), vocab if p.top_k == -1 else p.top_k), torch.full((rows,), p.top_p))
    probs = torch.log_softmax(x, -1).exp()
    return [int(torch.multinomial(probs[i], 1)) for i in range(rows)]


def timed(f, repeats: int) -> list[float]:
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    sampler, rows_out = Sampler(), []
    for kind, scale in LOGITS.items():
        for rows in args.rows:
            logits = torch.randn(rows, args.vocab, generator=gen) * scale
            for rule, fields in RULES.items():
                p = SamplingParams(**fields)
                seqs = [SimpleNamespace(params=p, processing=None, output_token_ids=[], generator=None)
                        for _ in range(rows)]
                ours = timed(lambda x=logits, s=seqs: sampler.sample(x, s, need_log_probs=False), args.repeats)
                base = timed(lambda x=logits, p=p: torch_path(x, p), args.repeats)
                speedup = statistics.median(base) / statistics.median(ours)
                rows_out.append({"logits": kind, "rows": rows, "rule": rule, "ours_ms": spread(ours),
                                 "torch_ms": spread(base), "speedup": speedup})
                print(f"{kind:6s} rows={rows:3d} {rule:28s} ours {statistics.median(ours):8.3f} ms, torch "
                      f"{statistics.median(base):8.3f} ms", file=sys.stderr)
    report = {"benchmark": "sampling", "machine": machine_info(), "vocab": args.vocab, "repeats": args.repeats,
              "rows": rows_out}
    publish(report, markdown(report), plot, args, "Sampling: ours against the torch path")
    return 0


def markdown(report: dict) -> str:
    def ms(s: dict) -> str:
        return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    lines = [f"Sampler time per call over a {report['vocab']}-token vocabulary, ms, median (min-max) of "
             f"{report['repeats']}; {report['machine']['cpu']}", "",
             "| logits | rows | rule | ours | torch path | speedup |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['logits']} | {r['rows']} | {r['rule']} | {ms(r['ours_ms'])} | {ms(r['torch_ms'])} | "
              f"{r['speedup']:.1f}x |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path):
    plt, fig, axes = new_figure(len(LOGITS), (6 * len(LOGITS), 4))
    for ax, kind in zip(axes, LOGITS):
        for rule in RULES:
            points = [r for r in report["rows"] if r["logits"] == kind and r["rule"] == rule]
            ax.plot([r["rows"] for r in points], [r["speedup"] for r in points], marker="o", label=rule)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows sampled in one call")
        ax.set_ylabel("torch path time / ours")
        ax.set_title(f"{kind} logits")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--vocab", type=int, default=49152, help="the default model's vocabulary by default")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="sampling", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
