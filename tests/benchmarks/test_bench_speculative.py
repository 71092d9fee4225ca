"""The speculative-decoding benchmark end to end on a tiny random zoo-shaped model (no tokenizer: byte prompts)."""

from __future__ import annotations

import json

import pytest

from llmengine_runtime.benchmarks import cli
from llmengine_runtime.benchmarks.speculative import compare
from tests.benchmarks.test_bench_decode import TINY


@pytest.mark.slow
def test_speculative_benchmark_end_to_end(tmp_path, capsys):
    rc = cli.main(["decode", *TINY, "--speculative", "ngram", "--num-speculative-tokens", "3", "--dtype", "float32",
                   "--max-new-tokens", "12", "--warmup", "0", "--repeats", "1", "--threads", "1",
                   "--out-dir", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "decode-speculative.json").read_text())
    assert rc == (0 if all(c["match"] for c in report["greedy_check"]) else 1)
    assert report["random_weights"] and report["num_speculative_tokens"] == 3
    rows = {(r["workload"], r["batch_size"]) for r in report["rows"]}
    assert rows == {(w, b) for w in ("input-grounded", "free generation") for b in (1, 4)}
    for r in report["rows"]:
        assert r["output_tokens"] == 4 * 12  # random weights: nothing stops before max_new_tokens
        assert 0 < r["plain_tok_s"]["min"] <= r["plain_tok_s"]["median"] <= r["plain_tok_s"]["max"]
        assert r["spec_tok_s"]["median"] > 0 and r["speedup"]["median"] > 0
        assert 0 <= r["accepted"] <= r["proposed"] and r["steps"]["plain"] >= 12
    assert len(report["greedy_check"]) == 2 * 2 * 4
    md = (tmp_path / "decode-speculative.md").read_text()
    assert "| workload | dtype | batch | k |" in md and "sequences identical" in md
    assert (tmp_path / "decode-speculative.png").stat().st_size > 1000
    assert "decode-speculative.json" in capsys.readouterr().out


def test_compare_finds_the_first_difference():
    checks = compare("float32", "w", 1, [[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 6], [6, 7]])
    assert [(c["match"], c["first_mismatch"]) for c in checks] == [(True, None), (False, 1), (False, 1)]
