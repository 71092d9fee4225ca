"""The weight-format benchmarks' bookkeeping: bytes a quantized decode step reads, the llama.cpp rows (on a
stand-in), perplexity windows and greedy agreement (benchmarks/quality.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmengine_runtime.benchmarks import decode, decode_runners, quality
from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.loader import load_model
from tests.benchmarks.test_bench_decode import TINY
from tests.benchmarks.test_bench_llamacpp import FakeLlama
from tests.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return save_tiny("llama-gqa-tied-bias", tmp_path_factory.mktemp("tied"))  # hidden 64, inter 96, vocab 128


def test_decode_weight_bytes_count_integer_weights(tiny_tied):
    """hidden 64, q 64 + k 32 + v 32 rows with biases, o with bias, gate/up 2 x 96, down K = 96, vocab 128, tied."""
    fp32 = decode_runners.decode_weight_bytes(load_model(tiny_tied, progress=False))
    per_layer = 128 * 64 + 128 + 64 * 64 + 64 + 192 * 64 + 64 * 96 + 2 * 64
    assert fp32 == 4 * (2 * per_layer + 64 + 128 * 64)  # + final norm + the table, which is the head
    int4 = decode_runners.decode_weight_bytes(load_model(tiny_tied, progress=False, quantize="int4", group_size=32))

    def int4_bytes(n: int, k: int) -> int:  # half a byte per weight, a bf16 (scale, zero) pair per 32
        return n * k // 2 + (k // 32) * n * 2 * 2

    per_layer = int4_bytes(128, 64) + 4 * 128 + int4_bytes(64, 64) + 4 * 64 + int4_bytes(192, 64) \
        + int4_bytes(64, 96) + 4 * 2 * 64
    assert int4 == 2 * per_layer + 4 * 64 + int4_bytes(128, 64)  # the quantized head; the table is not read


def test_llamacpp_rows_are_one_sequence():
    run = decode_runners.run_llamacpp_batch(FakeLlama(), [[1, 2, 3]], 5)
    assert run.token_ids == [[7, 8, 9, 10, 11]] and run.output_tokens == 5 and run.decode_tokens == 4
    assert run.total_time == pytest.approx(run.ttft + run.decode_time)
    with pytest.raises(ValueError):
        decode_runners.run_llamacpp_batch(FakeLlama(), [[1], [2]], 5)


@pytest.mark.slow
def test_decode_benchmark_weight_formats(tmp_path):
    rc = decode.main([*TINY, "--dtype", "float32", "--quantize", "none", "int8", "int4", "--batch-sizes", "1", "2",
                      "--max-new-tokens", "4", "--prompt-len", "5", "--warmup", "0", "--repeats", "1",
                      "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    weights = {(r["impl"], r["weights"], r["batch_size"]) for r in report["rows"]}
    assert weights == {(impl, w, b) for b in (1, 2) for impl, w in (
        ("ours", "float"), ("ours", "int8 per channel"), ("ours", "int4 g64"), ("transformers", "float"))}
    assert report["weight_bytes"]["float32 int4"] < report["weight_bytes"]["float32 int8"] \
        < report["weight_bytes"]["float32"]
    assert "| ours | float32 | int4 g64 | 1 |" in (tmp_path / "decode.md").read_text()


def test_perplexity_windows_score_each_token_once(tiny_tied):
    model = load_model(tiny_tied, progress=False)
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(40), AttentionMetadata.for_prompts([40])))
    expected = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    ppl, scored = quality.perplexity(model, ids, 64, progress=False)
    assert scored == 39 and ppl == pytest.approx(expected, rel=1e-5)
    ppl_windows, scored_windows = quality.perplexity(model, ids, 16, progress=False)
    assert scored_windows == 15 + 15 + 7 and ppl_windows != pytest.approx(ppl, rel=1e-6)  # less context each


def test_greedy_agreement():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert quality.agreement(reference, reference) == (1.0, 2)
    assert quality.agreement([[1, 2, 9, 9], [0, 6, 7, 8]], reference) == (0.25, 0)


def test_corpus_is_english_text():
    text = quality.corpus_text()
    assert len(text) > 100_000 and "The" in text
