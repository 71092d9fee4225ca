"""The sampling benchmark end to end on a small vocabulary."""

from __future__ import annotations

import json

from llmengine_runtime.benchmarks import cli, sampling


def test_sampling_benchmark_end_to_end(tmp_path, capsys):
    rc = cli.main(["sampling", "--rows", "1", "3", "--vocab", "500", "--repeats", "2", "--out-dir", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "sampling.json").read_text())
    assert {(r["logits"], r["rows"], r["rule"]) for r in report["rows"]} == \
        {(k, n, rule) for k in sampling.LOGITS for n in (1, 3) for rule in sampling.RULES}
    assert all(0 < r["ours_ms"]["min"] <= r["ours_ms"]["median"] <= r["ours_ms"]["max"] and r["speedup"] > 0
               for r in report["rows"])
    assert "| logits | rows | rule |" in (tmp_path / "sampling.md").read_text()
    assert (tmp_path / "sampling.png").stat().st_size > 1000
    assert "sampling.json" in capsys.readouterr().out


def test_the_torch_path_draws_from_the_truncated_rows():
    import torch

    from llmengine_runtime.runtime.params import SamplingParams

    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]] * 200)
    draws = sampling.torch_path(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(draws) == {1, 2}
    assert sampling.torch_path(logits[:3], SamplingParams(temperature=0.0)) == [1, 1, 1]
