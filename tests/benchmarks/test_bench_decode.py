"""The decode benchmark end to end on a tiny random zoo-shaped model, and its bookkeeping."""

from __future__ import annotations

import json

import pytest

from llmengine_runtime.benchmarks import cli, decode
from llmengine_runtime.benchmarks.decode import compare_outputs
from llmengine_runtime.benchmarks.decode_runners import Run, summarize_runs

TINY = ["--model", "llama-7b", "--num-layers", "1", "--override", "hidden_size=64", "--override",
        "intermediate_size=128", "--override", "num_attention_heads=4", "--override", "num_key_value_heads=2",
        "--override", "vocab_size=512"]


@pytest.mark.slow
def test_decode_benchmark_end_to_end(tmp_path, capsys):
    rc = cli.main(["decode", *TINY, "--dtype", "float32", "--batch-sizes", "1", "3", "--max-new-tokens", "4",
                   "--prompt-len", "5", "--warmup", "1", "--repeats", "2", "--check-text", "--out-dir", str(tmp_path),
                   "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    assert report["random_weights"] and report["num_layers"] == 1 and report["copy_bandwidth_gb_s"] > 0
    rows = {(r["impl"], r["batch_size"]): r for r in report["rows"]}
    assert set(rows) == {("ours", 1), ("ours", 3), ("transformers", 1), ("transformers", 3)}
    for (_, batch), r in rows.items():
        assert r["output_tokens"] == 4 * batch and r["decode_steps"] == 3 and r["prompt_tokens"] == 5
        assert 0 < r["ttft_ms"]["min"] <= r["ttft_ms"]["median"] <= r["ttft_ms"]["max"]
        assert r["tpot_ms"]["median"] > 0 and r["decode_tok_s"]["median"] > 0 and r["total_tok_s"]["median"] > 0
        assert r["weight_gb_s"]["median"] > 0 and r["weight_bw_pct_of_copy"] > 0 and r["peak_mem_mib"] >= 0
    # 1 layer, hidden 64, untied: q,k,v,o + gate,up,down + 2 norms + final norm + lm_head, fp32
    assert report["weight_bytes"]["float32"] == 4 * (64 * (64 + 2 * 32 + 64) + 3 * 64 * 128 + 3 * 64 + 512 * 64)
    # random weights, fp32, same token ids in: greedy tokens agree
    assert len(report["text_check"]) == 4 and all(c["match"] for c in report["text_check"])
    md = (tmp_path / "decode.md").read_text()
    assert "| impl | dtype | weights | batch |" in md and "4/4 sequences equal" in md
    assert (tmp_path / "decode.png").stat().st_size > 1000
    assert "decode.json" in capsys.readouterr().out


def _run(ttft, decode_time, steps, batch):
    return Run(ttft=ttft, decode_time=decode_time, decode_steps=steps, decode_tokens=steps * batch,
               total_time=ttft + decode_time, output_tokens=(steps + 1) * batch, token_ids=[[1] * (steps + 1)] * batch)


def test_summarize_runs():
    runs = [_run(0.1, 1.0, 10, 2), _run(0.3, 2.0, 10, 2), _run(0.2, 0.5, 10, 2)]
    s = summarize_runs(runs, weight_bytes=10**9, copy_bw=40e9)
    assert s["ttft_ms"] == pytest.approx({"median": 200.0, "min": 100.0, "max": 300.0})
    assert s["tpot_ms"] == pytest.approx({"median": 100.0, "min": 50.0, "max": 200.0})
    assert s["decode_tok_s"] == pytest.approx({"median": 20.0, "min": 10.0, "max": 40.0})
    assert s["total_tok_s"]["median"] == pytest.approx(22 / 1.1)
    assert s["weight_gb_s"] == pytest.approx({"median": 10.0, "min": 5.0, "max": 20.0})
    assert s["weight_bw_pct_of_copy"] == pytest.approx(25.0)


def test_compare_outputs_stops_at_our_eos():
    checks = compare_outputs("float32", {2: [[5, 6, 2, 9], [5, 6, 7]]}, {2: [[5, 6, 8, 8], [5, 7, 7]]}, {2}, None)
    assert [c["match"] for c in checks] == [True, False]  # row 0 differs only after our eos
    assert checks[1]["first_mismatch"] == 1


def test_random_weights_need_a_zoo_name(tmp_path):
    with pytest.raises(ValueError, match="zoo name"):
        decode.main(["--model", "no-such-model", "--num-layers", "1", "--out-dir", str(tmp_path), "--no-progress"])


def test_bench_subcommands_wire_into_a_parent_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="llmengine")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench")
    cli.add_bench_args(bench)
    bench.set_defaults(func=cli.run_bench)
    args = parser.parse_args(["bench", "decode", "--batch-sizes", "1", "4", "16", "--dtype", "float32", "bfloat16"])
    assert (args.command, args.bench_command, args.batch_sizes, args.dtype) == \
        ("bench", "decode", [1, 4, 16], ["float32", "bfloat16"])
    assert args.max_new_tokens == 128 and args.ignore_eos and args.prompt == decode.DEFAULT_PROMPT
    args = parser.parse_args(["bench", "serving", "--launch"])
    assert args.bench_command == "serving" and args.concurrency == [1, 16] and args.func is cli.run_bench


@pytest.mark.slow
def test_random_checkpoint_shards_load_in_both(tmp_path, monkeypatch):
    import torch
    import transformers

    from llmengine_runtime.benchmarks import random_model
    from llmengine_runtime.models.loader import load_model

    monkeypatch.setattr(random_model, "SHARD_BYTES", 10_000)
    config = random_model.random_config("llama-2-7b", 1, random_model.parse_overrides(
        ["hidden_size=32", "intermediate_size=48", "num_attention_heads=2", "num_key_value_heads=1",
         "vocab_size=256"]))
    folder = random_model.make_random_checkpoint(config, tmp_path / "ckpt", seed=3)
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    ours = load_model(folder, "float32", progress=False, pack=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(ours.embed.weight, hf.model.embed_tokens.weight)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    assert ours.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert random_model.make_random_checkpoint(config, folder) == folder  # complete: reused as is


@pytest.mark.slow
def test_quantized_formats_alone_against_transformers(tmp_path):
    """`--quantize int8` without `none`: the transformers rows still get their weight bytes (they are not ours)."""
    rc = cli.main(["decode", *TINY, "--dtype", "float32", "--quantize", "int8", "--batch-sizes", "1",
                   "--max-new-tokens", "3", "--prompt-len", "4", "--warmup", "0", "--repeats", "1",
                   "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    assert {r["impl"] for r in report["rows"]} == {"ours", "transformers"}
    # the untied float model's decode bytes, as the float32 row of the end-to-end test counts them
    assert report["weight_bytes"]["float32"] == 4 * (64 * (64 + 2 * 32 + 64) + 3 * 64 * 128 + 3 * 64 + 512 * 64)
    assert 0 < report["weight_bytes"]["float32 int8"] < report["weight_bytes"]["float32"]
