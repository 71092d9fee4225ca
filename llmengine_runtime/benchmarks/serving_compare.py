"""The serving report with a baseline server beside ours: both sides' runs (each with its scaling vs its own
single stream), ours/baseline ratios per level, the Markdown tables and the side-by-side plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmengine_runtime.benchmarks.common import fmt, markdown_table
from llmengine_runtime.benchmarks.report import add_vs_single_stream, new_figure, save_figure, serving_markdown

RATIOS = (("output_throughput", None), ("ttft_ms", "p50"), ("tpot_ms", "p50"))  # ours / baseline, per level


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None where either side has no number (or the baseline's is 0)."""
    if ours is None or theirs is None or ours != ours or theirs != theirs or theirs == 0:
        return None
    return ours / theirs


def level_name(spec: dict[str, Any]) -> str:
    return f"c={spec['concurrency']}" if spec["request_rate"] is None else f"{spec['request_rate']:g}/s"


def add_baseline(report: dict[str, Any], args: argparse.Namespace, baseline: argparse.Namespace,
                 runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`report` (ours) given the baseline's side (its settings and runs, with their scaling) and, per level, the
    ours/baseline ratios of output tok/s, TTFT p50 and TPOT p50 and each side's scaling vs its own single stream."""
    add_vs_single_stream(runs)
    report["ours_name"] = args.ours_name
    report["baseline"] = {"name": args.baseline_name, "base_url": baseline.base_url, "api": baseline.api,
                          "model": baseline.model, "launched": args.launch_baseline, "runs": runs}
    report["comparison"] = []
    for ours, theirs in zip(report["runs"], runs):
        row = {"concurrency": ours["concurrency"], "request_rate": ours["request_rate"],
               "ours_vs_single_stream": ours["vs_single_stream"],
               "baseline_vs_single_stream": theirs["vs_single_stream"]}
        for key, pct in RATIOS:
            a, b = (ours[key], theirs[key]) if pct is None else (ours[key][pct], theirs[key][pct])
            row[f"{key}{'_' + pct if pct else ''}_ratio"] = ratio(a, b)
        report["comparison"].append(row)
    return report


def side_report(report: dict[str, Any], side: str) -> dict[str, Any]:
    """One side as a plain serving report (what serving_markdown takes)."""
    if side == "ours":
        return report
    base = report["baseline"]
    return {**report, "base_url": base["base_url"], "api": base["api"], "model": base["model"], "runs": base["runs"]}


def compare_markdown(report: dict[str, Any]) -> str:
    """Both sides' tables, then one row per level: output tok/s of each, ours/baseline, each side's scaling vs its
    own single stream, and the latency ratios."""
    ours_name, base_name = report["ours_name"], report["baseline"]["name"]
    lines = [f"### {ours_name}", "", serving_markdown(side_report(report, "ours")),
             f"### {base_name}", "", serving_markdown(side_report(report, "baseline")),
             f"### {ours_name} vs {base_name}", "",
             "Same prompts and settings, levels run alternately (ours first); ratios are ours / baseline "
             "(above 1 is faster for tok/s, slower for TTFT and TPOT); scaling is each server's output tok/s over "
             "its own single stream.", ""]
    header = ["level", f"{ours_name} tok/s", f"{base_name} tok/s", "tok/s ratio", f"{ours_name} scaling",
              f"{base_name} scaling", "TTFT p50 ratio", "TPOT p50 ratio"]
    x = lambda v: f"{v:.2f}x" if v is not None else "-"
    rows = [[level_name(c), fmt(o["output_throughput"]), fmt(b["output_throughput"]),
             x(c["output_throughput_ratio"]), x(c["ours_vs_single_stream"]), x(c["baseline_vs_single_stream"]),
             x(c["ttft_ms_p50_ratio"]), x(c["tpot_ms_p50_ratio"])]
            for c, o, b in zip(report["comparison"], report["runs"], report["baseline"]["runs"])]
    lines.append(markdown_table(header, rows))
    return "\n".join(lines)


def compare_plot(report: dict[str, Any], path: Path) -> Path:
    """Output tok/s per level side by side, each side's scaling vs its own single stream, and TPOT p50."""
    sides = [(report["ours_name"], report["runs"], "tab:blue"),
             (report["baseline"]["name"], report["baseline"]["runs"], "tab:orange")]
    labels = [level_name(s) for s in report["runs"]]
    plt, fig, axes = new_figure(3, (14, 4))
    width = 0.4
    for j, (name, runs, color) in enumerate(sides):
        xs = [i + (j - 0.5) * width for i in range(len(runs))]
        axes[0].bar(xs, [s["output_throughput"] for s in runs], width, label=name, color=color)
        axes[1].plot(range(len(runs)), [s["vs_single_stream"] or float("nan") for s in runs], "o-", label=name,
                     color=color)
        axes[2].bar(xs, [s["tpot_ms"]["p50"] for s in runs], width, label=name, color=color)
    for i, (c, o, b) in enumerate(zip(report["comparison"], sides[0][1], sides[1][1])):
        if c["output_throughput_ratio"] is not None:  # ours/baseline above each pair of bars
            top = max(o["output_throughput"], b["output_throughput"])
            axes[0].annotate(f"{c['output_throughput_ratio']:.2f}x", (i, top), ha="center", va="bottom", fontsize=8)
    for ax, ylabel in zip(axes, ("output tok/s (all requests)", "output tok/s vs own 1 stream", "TPOT p50 (ms)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    title = (f"serving: {report['model']} ({report['ours_name']}) vs {report['baseline']['name']}, "
             f"max_new_tokens {report['max_new_tokens']}; ratios ours/baseline")
    return save_figure(plt, fig, title, path)
