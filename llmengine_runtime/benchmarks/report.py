"""Report formatting and writing for the benchmarks: the Markdown tables and PNG plots of each report kind, and
the output files (JSON, Markdown, PNG) with the optional RESULTS.md section."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmengine_runtime.benchmarks.common import append_results, fmt, machine_info, markdown_table, write_outputs


def publish(report: dict[str, Any], markdown: str, plot: Callable[[dict[str, Any], Path], Path],
            args: argparse.Namespace, title: str) -> dict[str, Path]:
    """Write `args.name`.json/.md/.png under `args.out_dir`, print the table, append it to benchmarks/RESULTS.md
    under `title` with --append-results, and print the paths written."""
    out_dir = Path(args.out_dir)
    paths = write_outputs(out_dir, args.name, report, markdown)
    paths["png"] = plot(report, out_dir / f"{args.name}.png")
    print(markdown)
    if args.append_results:
        print(f"appended to {append_results(title, markdown, report['machine'])}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def new_figure(ncols: int, size: tuple[float, float]):
    """A headless matplotlib figure with `ncols` axes side by side: (plt, fig, axes)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the benchmark plots need matplotlib: pip install '.[bench]' (make bench does)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    return plt, fig, axes


def log2_axes(ax, xs: list[int], xlabel: str, ylabel: str) -> None:
    """A log-2 x axis ticked at `xs`, labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(plt, fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- decode -------------------------------------------------------------------------------------------
def decode_markdown(report: dict[str, Any], show_text: bool = False) -> str:
    """The decode report's Markdown: a header line, one table row per run, the greedy-token check."""
    weights = "random weights, " if report["random_weights"] else ""
    lines = [f"Decode: {report['model']} ({weights}{report['num_layers']} layers) on {report['device']}, "
             f"{report['max_new_tokens']} new tokens{', ignore eos' if report['ignore_eos'] else ''}, "
             f"median (min-max) of {report['repeats']} after {report['warmup']} warm-up; copy bandwidth "
             f"{report['copy_bandwidth_gb_s']:.1f} GB/s; memory: {report['memory']}.", ""]
    baseline = report.get("baseline") or "transformers"
    header = ["impl", "dtype", "weights", "batch", "prompt", "TTFT ms", "TPOT ms", "decode tok/s", "total tok/s",
              "peak MiB", "weights GB/s (% copy)", f"vs {baseline}"]
    # transformers runs each dtype; llama.cpp (its own weights, batch 1) is the baseline of every dtype
    base_key = (lambda r: r["batch_size"]) if baseline == "llama.cpp" else (lambda r: (r["dtype"], r["batch_size"]))
    hf = {base_key(r): r for r in report["rows"] if r["impl"] == baseline}
    table = []
    for r in report["rows"]:
        base = hf.get(base_key(r))
        ratio = f"{r['decode_tok_s']['median'] / base['decode_tok_s']['median']:.2f}x" if base else "-"
        d = r["decode_tok_s"]
        table.append([r["impl"], r["dtype"], r.get("weights", "float"), r["batch_size"], r["prompt_tokens"],
                      fmt(r["ttft_ms"]["median"]),
                      fmt(r["tpot_ms"]["median"], 2), f"{fmt(d['median'])} ({fmt(d['min'])}-{fmt(d['max'])})",
                      fmt(r["total_tok_s"]["median"]), fmt(r["peak_mem_mib"], 0),
                      f"{fmt(r['weight_gb_s']['median'], 2)} ({fmt(r['weight_bw_pct_of_copy'], 0)}%)", ratio])
    lines.append(markdown_table(header, table))
    checks = report["text_check"]
    if checks:
        for name in dict.fromkeys(c.get("baseline", "transformers") for c in checks):
            mine = [c for c in checks if c.get("baseline", "transformers") == name]
            bad = [c for c in mine if not c["match"]]
            lines.append(f"Greedy tokens, ours vs {name}: {len(mine) - len(bad)}/{len(mine)} sequences equal"
                         + ("." if not bad else "; mismatches: " + ", ".join(
                             f"{c['dtype']} batch {c['batch_size']} row {c['row']} at token {c['first_mismatch']}"
                             for c in bad[:8]) + ".") + "  ")
        if show_text:
            for c in checks:
                if "ours_text" in c and c["batch_size"] == min(x["batch_size"] for x in checks):
                    lines.append(f"\n- {c['dtype']} ours: {c['ours_text']!r}\n- {c['dtype']} "
                                 f"{c.get('baseline', 'transformers')}: {c['transformers_text']!r}")
        lines.append("")
    return "\n".join(lines) + "\n"




def decode_plot(report: dict[str, Any], path: Path) -> Path:
    """decode tok/s and TPOT against batch size, one line per implementation and dtype, saved to `path`."""
    plt, fig, (ax_tok, ax_tpot) = new_figure(2, (11, 4.2))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in report["rows"]:
        weights = "" if r.get("weights", "float") == "float" else f" {r['weights']}"
        series.setdefault((r["impl"], r["dtype"] + weights), []).append(r)
    for (impl, dtype), rs in series.items():
        xs = [r["batch_size"] for r in rs]
        for ax, key in ((ax_tok, "decode_tok_s"), (ax_tpot, "tpot_ms")):
            med = [r[key]["median"] for r in rs]
            err = [[m - r[key]["min"] for m, r in zip(med, rs)], [r[key]["max"] - m for m, r in zip(med, rs)]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"{impl} {dtype}",
                        linestyle="-" if impl == "ours" else "--")
    batch_sizes = sorted({r["batch_size"] for r in report["rows"]})
    for ax, label in ((ax_tok, "decode tok/s"), (ax_tpot, "time per output token (ms)")):
        log2_axes(ax, batch_sizes, "batch size", label)
    return save_figure(plt, fig, f"decode: {report['model']} on {report['device']}, {report['max_new_tokens']} tokens",
                       path)


# -- serving ------------------------------------------------------------------------------------------
def add_vs_single_stream(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run given its output tok/s as a multiple of the first run's when that one is a single stream."""
    single = runs[0] if runs and runs[0]["concurrency"] == 1 else None
    for spec in runs:
        spec["vs_single_stream"] = spec["output_throughput"] / single["output_throughput"] \
            if single and single["output_throughput"] else None
    return runs


def serving_report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The serving report: the run settings, the machine, and the runs, each with its scaling
    (add_vs_single_stream)."""
    add_vs_single_stream(runs)
    info = machine_info()
    return {"benchmark": "serving", "machine": info, "base_url": args.base_url, "api": args.api,
            "model": args.model, "input_len": args.input_len, "max_new_tokens": args.max_new_tokens,
            "ignore_eos_sent": args.ignore_eos, "runs": runs}


def serving_markdown(report: dict[str, Any]) -> str:
    """The serving report's Markdown: a header line, one table row per run, the best scaling, the errors. Figures
    only: targets belong in benchmarks/RESULTS.md."""
    lines = [f"Serving: {report['model']} at {report['base_url']} ({report['api']} API), "
             f"prompts ~{report['input_len']} words, max_new_tokens {report['max_new_tokens']}; "
             "latencies in ms as p50 / p90 / p99.", ""]
    header = ["concurrency", "rate req/s", "ok/failed", "out tokens/req", "req/s", "output tok/s", "vs 1 stream",
              "TTFT", "TPOT", "ITL", "E2E"]
    pct = lambda d: f"{fmt(d['p50'])} / {fmt(d['p90'])} / {fmt(d['p99'])}"
    rows = [[s["concurrency"] or "-", s["request_rate"] or "inf",
             f"{s['completed']}/{s['failed']}", fmt(s["mean_output_tokens"]), fmt(s["request_throughput"], 2),
             fmt(s["output_throughput"]), f"{s['vs_single_stream']:.2f}x" if s["vs_single_stream"] else "-",
             pct(s["ttft_ms"]), pct(s["tpot_ms"]), pct(s["itl_ms"]), pct(s["e2e_ms"])] for s in report["runs"]]
    lines.append(markdown_table(header, rows))
    best = max(report["runs"], key=lambda s: s["vs_single_stream"] or 0)
    if best["vs_single_stream"]:
        lines.append(f"Aggregate output tok/s at concurrency {best['concurrency']}: {best['vs_single_stream']:.2f}x a "
                     "single stream.\n")
    for s in report["runs"]:
        if s["errors"]:
            lines.append(f"Errors at concurrency {s['concurrency']}: {'; '.join(s['errors'])}\n")
    return "\n".join(lines)




def serving_plot(report: dict[str, Any], path: Path) -> Path:
    """Output tok/s and TTFT/TPOT percentiles per run, as bars, saved to `path`."""
    runs = report["runs"]
    labels = [f"c={s['concurrency']}" if s["request_rate"] is None else f"{s['request_rate']:g}/s"
              for s in runs]
    plt, fig, axes = new_figure(3, (13, 4))
    axes[0].bar(labels, [s["output_throughput"] for s in runs], color="tab:blue")
    axes[0].set_ylabel("output tok/s (all requests)")
    for ax, key, title in ((axes[1], "ttft_ms", "TTFT (ms)"), (axes[2], "tpot_ms", "TPOT (ms)")):
        width = 0.8 / 3
        for j, p in enumerate(("p50", "p90", "p99")):
            ax.bar([i + (j - 1) * width for i in range(len(runs))], [s[key][p] for s in runs], width, label=p)
        ax.set_xticks(range(len(runs)), labels)
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, f"serving: {report['model']}, max_new_tokens {report['max_new_tokens']}", path)


# -- products -----------------------------------------------------------------------------------------
def products_markdown(report: dict[str, Any]) -> str:
    """A header line and one row per row count: each method's median ms (weight GB/s)."""
    names = list(report["max_rel_error_vs_float64"])
    counts = sorted({r["rows"] for r in report["rows"]})
    by_case = {(r["method"], r["rows"]): r for r in report["rows"]}
    lines = [f"Products: {report['matrices']} projection matrices of {report['model']} "
             f"({report['weight_bytes'] / 1e6:.0f} MB, {report['dtype']}), {report['threads']} threads, median ms "
             f"of {report['repeats']} (weight GB/s).", ""]
    table = [[n] + [f"{fmt(by_case[(name, n)]['ms'])} ({fmt(by_case[(name, n)]['weight_gb_s'])})" for name in names]
             for n in counts]
    lines.append(markdown_table(["rows", *names], table))
    return "\n".join(lines)


def products_plot(report: dict[str, Any], path: Path) -> Path:
    """ms for all products against the row count, one line per method, saved to `path`."""
    plt, fig, ax = new_figure(1, (7, 4.2))
    for name in report["max_rel_error_vs_float64"]:
        rs = [r for r in report["rows"] if r["method"] == name]
        ax.plot([r["rows"] for r in rs], [r["ms"] for r in rs], marker="o", label=name)
    log2_axes(ax, sorted({r["rows"] for r in report["rows"]}), "rows (tokens in the step)", "ms for all products")
    return save_figure(plt, fig, f"projection products: {report['model']}, {report['dtype']}", path)


# -- speculative decoding -----------------------------------------------------------------------------
def speculative_markdown(report: dict[str, Any]) -> str:
    """One row per dtype, workload and batch size: tok/s plain and speculative, their ratio, acceptance; then the
    greedy check (tokens identical with and without speculation, per prompt)."""
    lo, hi = report["prompt_lookup"]
    lookup = f", prompt lookup {lo}-{hi} tokens" if report["speculative"] == "ngram" else ""
    lines = [f"Speculative decoding ({report['speculative']}{lookup}): {report['model']} on {report['device']}, "
             f"greedy, up to {report['max_new_tokens']} new tokens (eos stops), median (min-max) of "
             f"{report['repeats']} after {report['warmup']} warm-up; tok/s = output tokens / generate time, prefill "
             "included; speedup = speculative / plain tok/s of each repeat; mean accepted length = accepted "
             "proposals per speculating sequence-step.", ""]
    header = ["workload", "dtype", "batch", "k", "tokens", "plain tok/s", "speculative tok/s", "speedup",
              "acceptance", "mean accepted length", "steps plain / spec"]
    table = []
    for r in report["rows"]:
        p, s, x = r["plain_tok_s"], r["spec_tok_s"], r["speedup"]
        table.append([r["workload"], r["dtype"], r["batch_size"], report["num_speculative_tokens"], r["output_tokens"],
                      f"{fmt(p['median'])} ({fmt(p['min'])}-{fmt(p['max'])})",
                      f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})",
                      f"**{x['median']:.2f}x** ({x['min']:.2f}-{x['max']:.2f})",
                      f"{100 * r['acceptance_rate']:.0f}% ({r['accepted']}/{r['proposed']})"
                      if r["proposed"] else "-", fmt(r["mean_accepted_length"], 2),
                      f"{r['steps']['plain']} / {r['steps']['speculative']}"])
    lines.append(markdown_table(header, table))
    checks = report["greedy_check"]
    bad = [c for c in checks if not c["match"]]
    lines.append(f"Greedy tokens with vs without speculation: {len(checks) - len(bad)}/{len(checks)} sequences "
                 "identical" + ("." if not bad else "; differing: " + ", ".join(
                     f"{c['workload']} batch {c['batch_size']} row {c['row']} from token {c['first_mismatch']}"
                     for c in bad[:8]) + "."))
    return "\n".join(lines) + "\n"


def speculative_plot(report: dict[str, Any], path: Path) -> Path:
    """tok/s plain vs speculative per workload and batch size (bars with min-max), and the acceptance rate."""
    plt, fig, (ax_tok, ax_acc) = new_figure(2, (11, 4.2))
    rows = report["rows"]
    labels = [f"{r['workload']}\n{r['dtype']}, batch {r['batch_size']}" for r in rows]
    xs = list(range(len(rows)))
    for offset, key, name in ((-0.2, "plain_tok_s", "plain"), (0.2, "spec_tok_s", "speculative")):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
        ax_tok.bar([x + offset for x in xs], med, width=0.4, yerr=err, capsize=3, label=name)
    ax_tok.set_xticks(xs, labels, fontsize=7)
    ax_tok.set_ylabel("tok/s")
    ax_tok.legend(fontsize=8)
    ax_tok.grid(True, axis="y", alpha=0.3)
    ax_acc.bar(xs, [100 * r["acceptance_rate"] if r["proposed"] else 0 for r in rows])
    ax_acc.set_xticks(xs, labels, fontsize=7)
    ax_acc.set_ylabel("proposals accepted (%)")
    ax_acc.grid(True, axis="y", alpha=0.3)
    k = report["num_speculative_tokens"]
    return save_figure(plt, fig, f"speculative decoding ({report['speculative']}, k={k}): {report['model']} on "
                       f"{report['device']}", path)
