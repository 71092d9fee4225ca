"""The llama.cpp baseline's timing loop, on a stand-in for llama_cpp.Llama (the real one is an optional,
compiled extra that `make test` does not install)."""

from __future__ import annotations

import itertools

from llmengine_runtime.benchmarks.llamacpp import run_llamacpp


class FakeLlama:
    """Yields 7, 8, 9, ... forever, as llama_cpp.Llama.generate does (it never stops by itself)."""

    def __init__(self):
        self.resets = 0
        self.prompts = []

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kwargs):
        assert kwargs["temp"] == 0.0 and kwargs["repeat_penalty"] == 1.0  # greedy, no penalty
        self.prompts.append(list(tokens))
        yield from itertools.count(7)


def test_exactly_max_new_tokens_past_any_end_token():
    llm = FakeLlama()
    run = run_llamacpp(llm, [1, 2, 3], 5)
    assert run.token_ids == [7, 8, 9, 10, 11] and run.decode_tokens == 4
    assert llm.prompts == [[1, 2, 3]] and llm.resets == 1
    assert run.ttft >= 0 and run.decode_time >= 0
