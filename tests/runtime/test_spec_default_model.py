"""N-gram speculation on the default model (it has a tokenizer): a list the model continues by copying, stop strings
and the stop token inside an accepted run, text, tokens and log-probs equal to plain decoding's."""

from __future__ import annotations

import pytest

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine
from tests.runtime.spec_helpers import record_verifications, run, spec_stats

LIST_PROMPT = "1. apple\n2. banana\n3. cherry\n1. apple\n2. banana\n3. cherry\n1. apple\n"


@pytest.fixture(scope="module")
def spec_engine(default_model_dir) -> Engine:
    return Engine(default_model_dir, device="cpu", kv_cache_gib=0.25, max_num_batched_tokens=512,
                  enable_prefix_caching=False, speculative="ngram")


@pytest.fixture(scope="module")
def plain_engine(default_llm) -> Engine:
    return default_llm.engine


def test_a_copied_list_is_mostly_accepted_and_equals_plain_decoding(spec_engine, plain_engine):
    params = SamplingParams(max_new_tokens=40, return_token_log_probs=True)
    before = spec_stats(spec_engine)
    [want] = run(plain_engine, [LIST_PROMPT], params)
    [got] = run(spec_engine, [LIST_PROMPT], params)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.text.startswith("2. banana\n3. cherry\n1. apple\n")
    assert got.log_probs == pytest.approx(want.log_probs, abs=1e-4)
    proposed, accepted, steps = (a - b for a, b in zip(spec_stats(spec_engine), before))
    assert accepted >= 0.8 * proposed > 0 and got.deltas < len(got.token_ids) / 2


@pytest.mark.parametrize("stop, include", [("cherry\n1", False), ("cherry\n1", True), ("banana", False)])
def test_a_stop_string_inside_an_accepted_run_ends_the_request_there(spec_engine, plain_engine, monkeypatch, stop,
                                                                     include):
    params = SamplingParams(max_new_tokens=40, stop_sequences=[stop], include_stop_str_in_output=include,
                            return_token_log_probs=True)
    steps = record_verifications(spec_engine, monkeypatch)
    [want] = run(plain_engine, [LIST_PROMPT], params)
    [got] = run(spec_engine, [LIST_PROMPT], params)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.finish_reason == "stop" and got.text.endswith(stop if include else "")
    assert got.log_probs == pytest.approx(want.log_probs, abs=1e-4)
    emitted_last = [step["r0"] for step in steps if "r0" in step][-1]
    assert len(got.last_token_ids) < len(emitted_last)  # verification emitted more; the stop dropped the rest


def test_the_stop_token_inside_an_accepted_run(spec_engine, plain_engine, monkeypatch):
    # The model copies the list and ends its answer; the prompt's "<|im_end|>\n<|im_start|>" makes n-gram proposals
    # of eos and what followed it there: eos is accepted, and the tokens after it are dropped.
    prompt = "<|im_start|>user\nCopy this list:\n1. apple\n2. banana\n3. cherry<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(max_new_tokens=40, return_token_log_probs=True)
    steps = record_verifications(spec_engine, monkeypatch)
    [want] = run(plain_engine, [prompt], params)
    [got] = run(spec_engine, [prompt], params)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.finish_reason == "stop" and got.token_ids[-1] in spec_engine.stop_token_ids
    assert got.log_probs == pytest.approx(want.log_probs, abs=1e-4)
    emitted_last = [step["r0"] for step in steps if "r0" in step][-1]
    kept = len(got.last_token_ids)
    assert kept < len(emitted_last) and emitted_last[kept - 1] == got.token_ids[-1]
