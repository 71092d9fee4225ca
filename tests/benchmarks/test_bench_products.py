"""The products benchmark end to end on a tiny zoo-shaped model."""

from __future__ import annotations

import json

import pytest
import torch

from llmengine_runtime.benchmarks import cli, products


@pytest.mark.slow
def test_products_benchmark_end_to_end(tmp_path, capsys):
    rc = cli.main(["products", "--model", "smollm2-135m-instruct", "--num-layers", "2", "--rows", "1", "3",
                   "--repeats", "2",
                   "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "products.json").read_text())
    assert report["matrices"] == 8  # 2 layers x (qkv, o, gate_up, down)
    # smollm2-135m: hidden 576, 9 query heads and 3 KV heads of 64, intermediate 1536
    assert report["weight_bytes"] == 4 * 2 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)
    methods = set(report["max_rel_error_vs_float64"])
    assert {"F.linear row-major", "F.linear column-major"} <= methods
    assert {(r["method"], r["rows"]) for r in report["rows"]} == {(m, n) for m in methods for n in (1, 3)}
    assert all(0 < r["min_ms"] <= r["ms"] <= r["max_ms"] and r["weight_gb_s"] > 0 for r in report["rows"])
    assert "| rows |" in (tmp_path / "products.md").read_text()
    assert (tmp_path / "products.png").stat().st_size > 1000
    assert "products.json" in capsys.readouterr().out


def test_a_wrong_product_is_caught():
    weights = [torch.randn(8, 4) for _ in range(4)]
    wrong = [lambda x, w=w: x @ w.t() * 1.001 for w in weights]
    with pytest.raises(AssertionError, match="wrong: relative error"):
        products.check("wrong", wrong, weights, torch.float32)
    right = [lambda x, w=w: x @ w.t() for w in weights]
    assert products.check("right", right, weights, torch.float32) < 1e-6
