"""benchmarks/neighbour.py on a tiny model: every (neighbours, threads) row is measured and reported."""

from __future__ import annotations

import json

import pytest
import torch

from llmengine_runtime.benchmarks import neighbour
from tests.models.tiny import save_tiny


@pytest.mark.slow  # two engines, a spinning neighbour process
def test_neighbour_benchmark_rows(tmp_path):
    folder = save_tiny("llama-mha", tmp_path / "tiny")
    before = torch.get_num_threads()
    try:
        rc = neighbour.main(["--model", str(folder), "--threads", "1", "auto", "--neighbours", "0", "1",
                             "--max-new-tokens", "8", "--repeats", "1", "--out-dir", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    report = json.loads((tmp_path / "neighbour.json").read_text())
    rows = [(r["neighbours"], r["threads"]) for r in report["rows"]]
    assert rows == [(0, "1"), (0, "auto"), (1, "1"), (1, "auto")]
    assert all(r["tok_s"]["median"] > 0 for r in report["rows"])
    assert report["rows"][0]["share_of_idle"] == 1.0  # the only fixed idle setting is the reference
    assert [r["tuned_to"] is not None for r in report["rows"]] == [False, True, False, True]
    assert "| 1 | auto |" in (tmp_path / "neighbour.md").read_text()
    assert (tmp_path / "neighbour.png").stat().st_size > 1000
