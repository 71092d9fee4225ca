"""Interactive latency while a batch job runs in the same server: TTFT of streamed requests, alone and with a
batch job of --job-prompts prompts running (POST /v2/batch-completions). A batch job keeps only a few of its
prompts in the engine at a time (server/batch_jobs.py), so an interactive request should queue behind those
few, not behind the whole batch.

    python -m llmengine_runtime.benchmarks.batch_interference --launch
        # starts a server with its own batch dir
    python -m llmengine_runtime.benchmarks.batch_interference --base-url http://127.0.0.1:5005

The same --interactive requests (one at a time) are sent twice: without a job, then once the job is running.
The job is cancelled afterwards (unless --let-job-finish). Writes NAME.json and NAME.md under --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from llmengine_runtime.benchmarks.common import (
    OUT_DIR,
    append_results,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    write_outputs,
)
from llmengine_runtime.benchmarks.serving import (
    compute_metrics,
    launch_server,
    make_requests,
    run_load,
    stop_server,
    wait_ready,
)


def client(args: argparse.Namespace) -> httpx.Client:
    headers = {"x-api-key": args.api_key} if args.api_key else {}
    return httpx.Client(base_url=args.base_url, headers=headers, timeout=60)


def start_job(args: argparse.Namespace, http: httpx.Client) -> str:
    prompts = [p for p, _ in make_requests(args.job_prompts, (args.input_len, args.input_len), (1, 1), args.seed + 7)]
    body = {"output_data_path": f"batch-interference-{uuid.uuid4().hex[:8]}.json",
            "model_config": {"model": args.model},
            "content": {"prompts": prompts, "max_new_tokens": args.job_max_new_tokens, "temperature": 0.0}}
    r = http.post("/v2/batch-completions", json=body)
    r.raise_for_status()
    return r.json()["job_id"]


def job_state(http: httpx.Client, job_id: str) -> dict[str, Any]:
    return http.get(f"/v2/batch-completions/{job_id}").json()["job"]


def measure(args: argparse.Namespace, label: str) -> dict[str, Any]:
    requests = make_requests(args.interactive, (args.input_len, args.input_len),
                             (args.max_new_tokens, args.max_new_tokens), args.seed)
    print(f"{label}: {args.interactive} interactive requests, one at a time", file=sys.stderr)
    results, duration = asyncio.run(run_load(args, requests, 1, None))
    return {"label": label, **compute_metrics(results, duration)}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(run_load(args, make_requests(2, (8, 8), (4, 4), args.seed + 1), 1, None))  # warm-up
    runs = [measure(args, "no batch job")]
    with client(args) as http:
        job_id = start_job(args, http)
        while (job := job_state(http, job_id))["progress"]["completed"] < 1 and job["status"] in ("queued", "running"):
            time.sleep(0.2)  # measure once the job is in its steady state
        t0, done0 = time.perf_counter(), job["progress"]["completed"]
        with_job = measure(args, f"{args.job_prompts}-prompt batch job running")
        job = job_state(http, job_id)
        with_job["job_prompts_per_s"] = (job["progress"]["completed"] - done0) / (time.perf_counter() - t0)
        with_job["job_status_after"] = job["status"]
        runs.append(with_job)
        if args.let_job_finish:
            while (job := job_state(http, job_id))["status"] in ("queued", "running"):
                time.sleep(1)
        else:
            http.post(f"/v2/batch-completions/{job_id}/actions/cancel", json={})
    return {"benchmark": "batch_interference", "machine": machine_info(), "base_url": args.base_url,
            "model": args.model, "input_len": args.input_len, "max_new_tokens": args.max_new_tokens,
            "interactive": args.interactive, "job_prompts": args.job_prompts,
            "job_max_new_tokens": args.job_max_new_tokens, "job_final": job, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    base, loaded = report["runs"]
    lines = [f"Batch interference: {report['model']} at {report['base_url']}; {report['interactive']} streamed "
             f"requests one at a time (~{report['input_len']} words, {report['max_new_tokens']} new tokens), "
             f"alone and beside a {report['job_prompts']}-prompt batch job ({report['job_max_new_tokens']} new "
             "tokens each). Latencies in ms as p50 / p90.", ""]
    pct = lambda d: f"{fmt(d['p50'])} / {fmt(d['p90'])}"
    rows = [[s["label"], f"{s['completed']}/{s['failed']}", pct(s["ttft_ms"]), pct(s["tpot_ms"]), pct(s["e2e_ms"])]
            for s in report["runs"]]
    lines.append(markdown_table(["interactive requests", "ok/failed", "TTFT", "TPOT", "E2E"], rows))
    ratio = loaded["ttft_ms"]["p50"] / base["ttft_ms"]["p50"] if base["ttft_ms"]["p50"] else float("nan")
    lines.append(f"p50 TTFT with the job running: {fmt(ratio, 2)}x without. The job completed "
                 f"{fmt(loaded['job_prompts_per_s'], 2)} prompts/s meanwhile (status afterwards: "
                 f"{loaded['job_status_after']}).\n")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    proc = None
    if args.launch:
        args.server_args = f"{args.server_args} --batch-dir {out_dir.resolve() / 'batch-dir'}"
        proc = launch_server(args, out_dir / f"{args.name}-server.log")
    try:
        wait_ready(args.base_url, args.launch_timeout if proc else 2, proc)
        report = benchmark(args)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"batch interference benchmark: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    text = markdown(report)
    paths = write_outputs(out_dir, args.name, report, text)
    print(f"{machine_line(report['machine'])}\n\n{text}")
    if args.append_results:
        print(f"appended to {append_results('batch interference: ' + args.model, text, report['machine'])}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(s["failed"] == 0 for s in report["runs"]) else 1


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:5005")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model endpoint name (default: %(default)s)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--interactive", type=int, default=20, help="interactive requests per measurement")
    parser.add_argument("--input-len", type=int, default=64, help="prompt words, interactive and job prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="per interactive request")
    parser.add_argument("--job-prompts", type=int, default=500)
    parser.add_argument("--job-max-new-tokens", type=int, default=32)
    parser.add_argument("--let-job-finish", action="store_true", help="wait for the job instead of cancelling it")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launch", action="store_true", help="start `llmengine serve` and stop it after")
    parser.add_argument("--port", type=int, default=None, help="with --launch (default: a free port)")
    parser.add_argument("--server-args", default="", help="extra arguments for the launched server, one string")
    parser.add_argument("--launch-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--name", default="batch_interference", help="output file stem (default: %(default)s)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.set_defaults(api="llm", ignore_eos=True)  # what serving.run_load and send_llm read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.batch_interference",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
