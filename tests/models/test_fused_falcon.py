"""Falcon in the one-call CPU step (kernels/cpu/falcon_step.cpp): every tiny Falcon form runs through it, with the
eager blocks' numbers exactly (the same C++ kernels in the same order: LayerNorm and GELU included), and in fp32
with transformers' greedy tokens and logits within 1e-4."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.models import loader
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.executor import CpuStepExecutor
from tests.fast import fast_subset
from tests.models.test_fused_decode import PROMPTS, chunks_and_verification, run

FALCONS = ["falcon-7b-like", "falcon-40b-like", "falcon-11b-like", "falcon-rw-like"]


@pytest.mark.parametrize("variant", fast_subset(FALCONS, ["falcon-40b-like", "falcon-rw-like"]))
@pytest.mark.parametrize("mode", fast_subset(["int4", "int8"], ["int4"]))
def test_falcon_step_matches_eager(tiny_dirs, variant, mode, monkeypatch):
    """Parallel attention and MLP from one norm (7b, 11b) or two (40b), and sequential with ALiBi and biases (rw)."""
    fused, took = run(tiny_dirs[variant], mode, True, monkeypatch)
    eager, took_eager = run(tiny_dirs[variant], mode, False, monkeypatch)
    assert took and not took_eager
    assert fused == eager  # tokens and log-probs, bit for bit


@pytest.mark.parametrize("variant", fast_subset(["falcon-7b-like", "falcon-rw-like"], ["falcon-rw-like"]))
@pytest.mark.parametrize("speculative", fast_subset([None, "ngram"], [None]))
def test_falcon_step_takes_prompt_chunks_and_verification(tiny_dirs, variant, speculative, monkeypatch):
    """Prompt chunks of 5 tokens beside decode rows, and n-gram verification rows, go through the C++ step (for
    falcon-rw, ALiBi over several query rows a sequence), with the eager path's numbers."""
    results, shapes = chunks_and_verification(tiny_dirs[variant], speculative, monkeypatch)
    assert results["1"] == results["0"]
    assert any(tokens > seqs for seqs, tokens in shapes)  # several rows for a sequence, in one C++ step


def test_falcon_step_runs_bf16_weights(tiny_dirs, monkeypatch):
    """`--dtype bfloat16` on a Falcon folder: bf16 weights (models/float_linear.py), the C++ step, the eager numbers."""
    results = {}
    for fused in (True, False):
        monkeypatch.setenv("LLMENGINE_FUSED_DECODE", "1" if fused else "0")
        llm = LLM(tiny_dirs["falcon-40b-like"], dtype="bfloat16", block_size=16, cpu_threads=2)
        params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
        results[fused] = [(r.token_ids, r.log_probs) for r in llm.generate(PROMPTS, params, progress=False)]
        assert isinstance(llm.engine.runner.executor, CpuStepExecutor) == fused
    assert results[True] == results[False]


@pytest.mark.parametrize("variant", fast_subset(FALCONS, ["falcon-7b-like", "falcon-rw-like"]))
def test_falcon_step_in_fp32_gives_transformers_tokens(tiny_dirs, variant, monkeypatch):
    """fp32 weights on the C++ product (FloatLinear, as bf16 ones run: here forced for fp32, which by default runs
    oneDNN's eager blocks), the whole step in C++: transformers' greedy tokens, and its log-probs within 1e-4."""
    from tests.models.tiny import make_hf_model

    monkeypatch.setattr(loader, "float_weights_apply", lambda model, dtype: dtype == torch.float32)
    llm = LLM(tiny_dirs[variant], dtype="float32", block_size=16, cpu_threads=2)
    assert isinstance(llm.engine.runner.executor, CpuStepExecutor)
    prompts = [[5, 17, 99, 3, 64], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    ours = llm.generate(prompts, params, progress=False)
    hf = make_hf_model(variant)
    for prompt, got in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        assert got.token_ids == expected
        log_probs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, expected)]
        assert max(abs(a - b) for a, b in zip(got.log_probs, log_probs)) < 1e-4
