"""`llmengine bench decode ...`, `llmengine bench serving ...`, `llmengine bench products ...` and `llmengine bench
sampling ...`.

llmengine_runtime.cli wires it in:

    bench = sub.add_parser("bench", help="decode-speed and serving benchmarks")
    add_bench_args(bench)
    bench.set_defaults(func=run_bench)
"""

from __future__ import annotations

import argparse
import sys

from llmengine_runtime.benchmarks import decode, products, sampling, serving


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{decode,serving,products,sampling}")
    for name, module, summary in (("decode", decode, "offline decode speed, ours vs transformers generate"),
                                  ("serving", serving, "latency and throughput of a running server"),
                                  ("products", products, "the projection products by weight layout and rows"),
                                  ("sampling", sampling, "the sampler's time by rule and rows, ours vs torch")):
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)


def run_bench(args: argparse.Namespace) -> int:
    return {"decode": decode.run, "serving": serving.run, "products": products.run,
            "sampling": sampling.run}[args.bench_command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
