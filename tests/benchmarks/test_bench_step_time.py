"""benchmarks/step_time.py on a tiny int4 Llama: the fused step's parts are timed and the outputs written."""

from __future__ import annotations

from argparse import Namespace

import pytest

from llmengine_runtime.benchmarks import step_time
from tests.models.tiny import save_tiny


@pytest.mark.slow  # loads and quantizes a model, decodes 20 steps
@pytest.mark.parametrize("batch", [1, 3])
def test_step_time_splits_a_fused_step(tmp_path, batch):
    path = save_tiny("llama-gqa-tied-bias", tmp_path / "tiny")
    args = Namespace(model=str(path), quantize="int4", kv_cache_dtype="auto", threads=1, prompt_len=5, steps=6,
                     repeats=2, no_progress=True, batch=batch)
    report = step_time.run(args)
    parts = {key: value["median"] for key, value in report["parts"].items()}
    assert report["fused"] and parts["products"] > 0 and parts["attention"] > 0
    assert report["kv_cache_dtype"] == "float16"  # "auto" with int4 weights on CPU
    assert parts["fused_step"] <= parts["forward"] <= parts["model"] <= parts["step"]
    inner = sum(parts[p] for p in step_time.KERNEL_PARTS) + parts["kernels_rest"]
    assert abs(inner - parts["fused_step"]) < 1e-9
    assert parts["head_kernel"] > 0 and parts["head"] == parts["head_kernel"]  # the int4 head runs in the step
    assert abs(parts["outside_products"] - (parts["step"] - parts["products"] - parts["head"])) < 1e-9
    table = step_time.markdown(report)
    assert "| . . . . attention |" in table and "| outside the products" in table
    assert f"Batch-{batch} decode step" in table and ("ms per token" if batch == 1 else "ms per step") in table
    assert step_time.plot(report, tmp_path / "step.png").stat().st_size > 1000
