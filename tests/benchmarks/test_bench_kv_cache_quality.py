"""benchmarks.kv_cache_quality: decode-path perplexity by KV-cache type, on a short stretch of the default model's
text (the engine scores the prompt one token a step, so every step reads the cache back)."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest

from llmengine_runtime.benchmarks import kv_cache_quality


@pytest.mark.slow  # four engines over the default model
def test_fp16_cache_perplexity_is_reported_next_to_fp32(default_model_dir, tmp_path):
    args = Namespace(model=str(default_model_dir), formats=["gguf"], tokens=40, threads=1, no_progress=True,
                     out_dir=str(tmp_path), name="kvq", append_results=False)
    assert kv_cache_quality.run(args) == 0
    report = json.loads((tmp_path / "kvq.json").read_text())
    (row,) = report["rows"]
    fp32, fp16 = row["perplexity_fp32_cache"], row["perplexity_fp16_cache"]
    assert math.isfinite(fp32) and 1 < fp32 < 1e4  # a real model on English text, not a uniform guess (49152)
    assert abs(fp16 / fp32 - 1) < 0.01 and row["fp16_vs_fp32_pct"] == 100 * (fp16 / fp32 - 1)
    assert "first 40 tokens" in report["text"] and "| gguf |" in (tmp_path / "kvq.md").read_text()
    assert (tmp_path / "kvq.png").stat().st_size > 1000
