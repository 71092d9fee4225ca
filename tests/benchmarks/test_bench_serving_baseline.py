"""The serving benchmark with a baseline: two fake servers side by side in one report, levels interleaved, the
ratios computed from the two sides' numbers; the baseline's launch command (environment, {port}, paths, stop)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from fake_sse_server import FakeServer

from llmengine_runtime.benchmarks import serving
from llmengine_runtime.benchmarks.serving_baseline import split_command
from llmengine_runtime.benchmarks.serving_compare import add_baseline

FAKE = Path(__file__).parent / "fake_sse_server.py"


def record_levels(monkeypatch) -> list[tuple[str, str, str, int | None]]:
    """Every run_load call as (base url, api, model, concurrency), in order."""
    calls = []
    real = serving.run_load

    def spy(args, requests, concurrency, rate, bar=None):
        calls.append((args.base_url, args.api, args.model, concurrency))
        return real(args, requests, concurrency, rate, bar)

    monkeypatch.setattr(serving, "run_load", spy)
    return calls


@pytest.mark.slow  # two fake servers, the client and a plot: seconds
def test_baseline_side_by_side(tmp_path, monkeypatch):
    calls = record_levels(monkeypatch)
    with FakeServer() as ours, FakeServer() as base:
        rc = serving.main(["--base-url", ours.url, "--model", "fake", "--api", "llm", "--concurrency", "1", "3",
                           "--max-new-tokens", "4", "--input-len", "4", "--out-dir", str(tmp_path), "--no-progress",
                           "--baseline-url", base.url, "--baseline-name", "other engine", "--baseline-model", "m2"])
        ours_bodies, base_bodies = ours.app.state.bodies, base.app.state.bodies
    assert rc == 0
    # a warm-up on each, then each level against ours and right after against the baseline, on its OpenAI route
    levels = [(u, c) for u, _, _, c in calls]
    assert levels == [(ours.url, 1), (base.url, 1), (ours.url, 1), (base.url, 1), (ours.url, 3), (base.url, 3)]
    assert {(api, model) for u, api, model, _ in calls if u == base.url} == {("openai", "m2")}
    assert len(ours_bodies) == len(base_bodies) == 1 + 4 + 6
    assert all("max_new_tokens" in b for b in ours_bodies)  # ours kept its LLM Engine route
    assert all(b["model"] == "m2" and b["stream"] for b in base_bodies)
    assert [b["max_tokens"] for b in base_bodies] == [8] + [4] * 10  # the warm-up, then the levels
    # the same prompts on both sides (in flight together, they may arrive in another order)
    assert sorted(b["prompt"] for b in ours_bodies) == sorted(b["prompt"] for b in base_bodies)

    report = json.loads((tmp_path / "serving.json").read_text())
    base = report["baseline"]
    assert (base["name"], base["model"], base["api"]) == ("other engine", "m2", "openai")
    assert base["base_url"] != report["base_url"]
    for side in (report["runs"], base["runs"]):
        assert [r["concurrency"] for r in side] == [1, 3]
        assert all(r["completed"] == r["num_prompts"] and r["failed"] == 0 and r["mean_output_tokens"] == 4
                   for r in side)
        assert side[0]["vs_single_stream"] == pytest.approx(1.0)
        assert side[1]["vs_single_stream"] == pytest.approx(side[1]["output_throughput"] /
                                                            side[0]["output_throughput"])
    for row, o, b in zip(report["comparison"], report["runs"], base["runs"]):
        assert row["output_throughput_ratio"] == pytest.approx(o["output_throughput"] / b["output_throughput"])
        assert row["ttft_ms_p50_ratio"] == pytest.approx(o["ttft_ms"]["p50"] / b["ttft_ms"]["p50"])
        assert row["tpot_ms_p50_ratio"] == pytest.approx(o["tpot_ms"]["p50"] / b["tpot_ms"]["p50"])
        assert (row["ours_vs_single_stream"], row["baseline_vs_single_stream"]) == \
            (o["vs_single_stream"], b["vs_single_stream"])
    md = (tmp_path / "serving.md").read_text()
    assert "### llmengine" in md and "### other engine" in md and "### llmengine vs other engine" in md
    ratio3 = report["comparison"][1]["output_throughput_ratio"]
    assert f"| c=3 | {report['runs'][1]['output_throughput']:.1f} | {base['runs'][1]['output_throughput']:.1f} | " \
           f"{ratio3:.2f}x |" in md
    assert (tmp_path / "serving.png").stat().st_size > 1000


def test_add_baseline_ratios_from_both_sides():
    def run(c, tok_s, ttft, tpot):
        return {"concurrency": c, "request_rate": None, "output_throughput": tok_s,
                "ttft_ms": {"p50": ttft}, "tpot_ms": {"p50": tpot}}

    ours = [run(1, 100.0, 10.0, 5.0), run(16, 400.0, 40.0, 20.0), run(64, 500.0, 80.0, float("nan"))]
    theirs = [run(1, 20.0, 50.0, 25.0), run(16, 160.0, 20.0, 50.0), run(64, 0.0, 0.0, 60.0)]
    for r in ours:
        r["vs_single_stream"] = r["output_throughput"] / 100.0
    args = argparse.Namespace(ours_name="us", baseline_name="them", launch_baseline=None)
    base = argparse.Namespace(base_url="http://b", api="openai", model="m")
    report = add_baseline({"runs": ours}, args, base, theirs)
    rows = report["comparison"]
    assert [r["output_throughput_ratio"] for r in rows[:2]] == pytest.approx([5.0, 2.5])
    assert rows[2]["output_throughput_ratio"] is None and rows[2]["ttft_ms_p50_ratio"] is None  # baseline's 0
    assert rows[2]["tpot_ms_p50_ratio"] is None  # ours NaN
    assert [r["ttft_ms_p50_ratio"] for r in rows[:2]] == pytest.approx([0.2, 2.0])
    assert [r["baseline_vs_single_stream"] for r in rows] == pytest.approx([1.0, 8.0, 0.0])
    assert [r["ours_vs_single_stream"] for r in rows] == pytest.approx([1.0, 4.0, 5.0])


def test_split_command_env_port_and_paths(tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "base-python").touch()
    (tmp_path / "venv" / "bin" / "python").symlink_to(tmp_path / "base-python")  # as a venv's is
    words, env = split_command("A=1 B='x y' venv/bin/python -m srv --model /abs/folder --port {port} --x=a/b",
                               port=1234, cwd=tmp_path)
    assert env == {"A": "1", "B": "x y"}
    assert words == [str(tmp_path / "venv/bin/python"), "-m", "srv", "--model", "/abs/folder", "--port", "1234",
                     "--x=a/b"]  # only existing relative paths become absolute, symlinks kept (the venv's python)
    with pytest.raises(ValueError):
        split_command("A=1", port=1, cwd=tmp_path)


@pytest.mark.slow  # two server processes start
def test_launch_baseline_starts_and_stops_it(tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "SERVER_COMMAND", [sys.executable, str(FAKE)])
    launched = []
    real_launch = serving.launch_baseline
    monkeypatch.setattr(serving, "launch_baseline", lambda *a: launched.append(real_launch(*a)) or launched[-1])
    calls = record_levels(monkeypatch)
    rel = FAKE.relative_to(Path.cwd()) if FAKE.is_relative_to(Path.cwd()) else FAKE
    rc = serving.main(["--launch", "--model", "fake", "--api", "openai", "--concurrency", "2", "--max-new-tokens",
                       "3", "--out-dir", str(tmp_path), "--no-progress", "--baseline-name", "fake2",
                       "--launch-baseline", f"SOME_ENV=1 {sys.executable} {rel} --port {{port}} --model fake"])
    assert rc == 0 and launched and launched[0].poll() is not None  # stopped after
    assert not Path(launched[0].workdir).exists() and not Path(launched[0].workdir).is_relative_to(Path.cwd())
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["baseline"]["runs"][0]["completed"] == 4 and report["runs"][0]["completed"] == 4
    assert report["baseline"]["base_url"] != report["base_url"]
    assert len({u for u, *_ in calls}) == 2
    assert (tmp_path / "serving-baseline.log").exists()


@pytest.mark.slow
def test_baseline_not_answering_fails(tmp_path):
    with FakeServer() as ours:
        rc = serving.main(["--base-url", ours.url, "--model", "fake", "--concurrency", "1", "--out-dir",
                           str(tmp_path), "--no-progress", "--baseline-url", "http://127.0.0.1:9"])
    assert rc == 1 and not (tmp_path / "serving.json").exists()
