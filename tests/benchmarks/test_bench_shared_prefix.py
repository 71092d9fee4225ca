"""The shared-prefix benchmark end to end on a tiny random model (no tokenizer: byte prompts)."""

from __future__ import annotations

import json

import pytest

from llmengine_runtime.benchmarks import shared_prefix
from tests.models.tiny import save_tiny


@pytest.mark.slow
def test_shared_prefix_benchmark_end_to_end(tmp_path, capsys):
    folder = save_tiny("llama-mha", tmp_path / "tiny")  # vocab 128, 128 positions
    rc = shared_prefix.main(["--model", str(folder), "--requests", "4", "--prefix-tokens", "40", "--max-new-tokens",
                             "6", "--block-size", "8", "--kv-cache-gib", "0.01", "--threads", "1",
                             "--out-dir", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "shared_prefix.json").read_text())
    # caching must not change a single greedy token, in either arrival pattern
    assert report["outputs_identical"] and rc == 0
    assert [(c["arrival"], c["request"]) for c in report["greedy_check"]] == \
        [(a, i) for a in ("concurrent", "sequential") for i in range(1, 5)]
    assert report["shared_prefix_tokens"] == 40 + len("\n\nQuestion: ")
    rows = {(r["arrival"], r["prefix_caching"]): r for r in report["rows"]}
    assert set(rows) == {(a, c) for a in ("concurrent", "sequential") for c in (False, True)}
    prompt_tokens = sum(report["prompt_tokens"])
    for (arrival, caching), r in rows.items():
        assert r["output_tokens"] == 4 * 6 and len(r["ttft_all_ms"]) == 4 and r["ttft_first_ms"] > 0
        assert 0 < r["ttft_rest_ms"]["p50"] <= r["ttft_rest_ms"]["p90"] and r["tok_s"] > 0
        if caching:  # requests 2-4 find the shared prompt's 6 full blocks of 8 tokens; request 1 finds nothing
            assert r["prefix_cache_hits"] == 3 * 48 and r["prefix_cache_queries"] == prompt_tokens
            assert r["hit_rate"] == pytest.approx(3 * 48 / prompt_tokens)
            assert r["tokens_computed"] == rows[(arrival, False)]["tokens_computed"] - 3 * 48
            assert r["tok_s_vs_off"] > 0
        else:
            assert r["prefix_cache_hits"] == 0 and r["tokens_computed"] == prompt_tokens + 4 * 5
    md = (tmp_path / "shared_prefix.md").read_text()
    assert "| arrival | prefix caching | TTFT req 1 |" in md and "8/8 requests identical" in md
    assert (tmp_path / "shared_prefix.png").stat().st_size > 1000
    assert "shared_prefix.json" in capsys.readouterr().out


def test_common_prefix():
    assert shared_prefix.common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert shared_prefix.common_prefix([[5], [6]]) == 0
