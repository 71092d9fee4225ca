"""Statistics and output helpers the benchmarks share."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llmengine_runtime.benchmarks import common

SAMPLES = [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.random.default_rng(0).random(37))]


@pytest.mark.parametrize("values", SAMPLES)
@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan():
    assert math.isnan(common.percentile([], 50))


def test_spread_and_distribution():
    assert common.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    d = common.distribution([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["p50"] == 2.5 and d["p90"] == pytest.approx(3.7) and d["p99"] == pytest.approx(3.97)
    assert all(math.isnan(v) for v in common.spread([]).values())


def test_parse_range():
    assert common.parse_range("128") == (128, 128)
    assert common.parse_range("64:256") == (64, 256)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(ValueError):
            common.parse_range(bad)


def test_outputs_are_strict_json_and_results_append(tmp_path):
    report = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}
    paths = common.write_outputs(tmp_path / "out", "x", report, "| a |\n")
    assert json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"a": None, "b": [1.0, None], "c": {"d": 2}}
    info = common.machine_info()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]
    results = tmp_path / "RESULTS.md"
    common.append_results("first", common.markdown_table(["x", "y"], [[1, 2]]), info, results)
    common.append_results("second", "| z |\n", info, results)
    text = results.read_text()
    assert text.startswith("# Benchmark results") and text.count("\n## ") == 2
    assert "| x | y |\n| --- | --- |\n| 1 | 2 |" in text and info["cpu"] in text


def test_peak_memory_and_copy_bandwidth_on_cpu():
    memory = common.PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert memory.peak_bytes() >= 60 << 20
    del block
    assert common.copy_bandwidth(torch.device("cpu"), mib=16, repeats=2) > 1e8


def test_machine_info_says_whether_amx_tiles_were_on(monkeypatch):
    monkeypatch.setattr(common, "_cpu_has", lambda flag: flag == "amx_int8")
    monkeypatch.setenv("LLMENGINE_AMX", "0")
    info = common.machine_info()
    assert info["amx_tiles"] is False and "AMX tiles off" in common.machine_line(info)
    monkeypatch.delenv("LLMENGINE_AMX")
    assert common.machine_info()["amx_tiles"] is True
    monkeypatch.setattr(common, "_cpu_has", lambda flag: False)
    assert "amx_tiles" not in common.machine_info()
