"""Prompt scoring with its own top-N (SamplingParams.prompt_top_log_probs) and each prompt token's rank (vLLM's
prompt_logprobs), against the model's own log-softmax on a tiny random Llama."""

from __future__ import annotations

import random

import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.runtime import RequestOutput, SamplingParams
from llmengine_runtime.runtime.engine import Engine
from llmengine_runtime.runtime.log_probs import prompt_scores, score_positions
from tests.runtime.spec_helpers import make_engine

TOL = 1e-4  # the engine's cached, chunked forward against one cache-less forward


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def first_outputs(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
    """Each request's first output (the one with its prompt's scores), run to the end; every block back."""
    firsts: dict[str, RequestOutput] = {}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(i))
    while engine.has_unfinished():
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
    assert engine.block_manager.num_used == 0
    return [firsts[str(i)] for i in range(len(requests))]


def direct_log_softmax(engine: Engine, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(prompt), torch.arange(len(prompt)),
                              AttentionMetadata.for_prompts([len(prompt)]))
        return torch.log_softmax(engine.model.compute_logits(hidden).float(), dim=-1)


def rank_bounds(row: torch.Tensor, log_prob: float) -> tuple[int, int]:
    """The ranks a token of this log-prob may have in `row`, allowing TOL for the two forwards' difference."""
    return 1 + int((row > log_prob + TOL).sum()), 1 + int((row > log_prob - TOL).sum())


def test_score_positions_rank_counts_strictly_higher_log_probs():
    class Identity:  # logits are the hidden states themselves
        @staticmethod
        def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
            return hidden

    hidden = torch.tensor([[0.0, 2.0, 2.0, 1.0, -1.0],  # a tie above the target: both count
                           [3.0, 1.0, 1.0, 0.0, 2.0],  # a tie with the target: it does not
                           [5.0, 0.0, 0.0, 0.0, 0.0]])  # the most likely token
    targets = [3, 1, 0]
    log_probs, ranks, tops = score_positions(Identity(), hidden, targets, [2, 0, 1])
    direct = torch.log_softmax(hidden, dim=-1)
    assert log_probs == pytest.approx([float(direct[i, t]) for i, t in enumerate(targets)], abs=1e-6)
    assert ranks == [3, 3, 1]
    assert [t for t, _ in tops[0]] == [1, 2] and tops[1] == [] and [t for t, _ in tops[2]] == [0]


@pytest.mark.parametrize("budget", [2048, 5])  # one shot; chunks of 5 tokens over several steps
def test_prompt_ranks_and_own_top_n_match_the_model(folder, cache_gib, budget):
    rng = random.Random(1)
    prompt = [rng.randrange(3, 128) for _ in range(29)]
    engine = make_engine(folder, cache_gib, max_num_batched_tokens=budget)
    own, zero, echo = first_outputs(engine, [
        (prompt, SamplingParams(max_new_tokens=2, prompt_log_probs=True, prompt_top_log_probs=3, ignore_eos=True)),
        (prompt, SamplingParams(max_new_tokens=0, prompt_log_probs=True, prompt_top_log_probs=0, top_log_probs=4)),
        (prompt, SamplingParams(max_new_tokens=2, prompt_log_probs=True, top_log_probs=2, ignore_eos=True))])
    direct = direct_log_softmax(engine, prompt)
    for out in (own, zero, echo):
        assert len(out.prompt_ranks) == len(out.prompt_log_probs) == len(prompt)
        assert out.prompt_ranks[0] is None and out.prompt_log_probs[0] is None
        assert out.prompt_ranks == own.prompt_ranks and out.prompt_log_probs[1:] == pytest.approx(
            own.prompt_log_probs[1:], abs=1e-5)
    assert zero.prompt_top_log_probs is None  # prompt top-N 0: none, whatever the output's top-N
    assert all(len(top) == 2 for top in echo.prompt_top_log_probs[1:])  # -1: as top_log_probs (echo)
    for i in range(1, len(prompt)):
        row, token = direct[i - 1], prompt[i]
        assert own.prompt_log_probs[i] == pytest.approx(float(row[token]), abs=TOL)
        low, high = rank_bounds(row, float(row[token]))
        assert low <= own.prompt_ranks[i] <= high, (i, own.prompt_ranks[i], low, high)
        values, ids = row.topk(3)
        assert [t for t, _ in own.prompt_top_log_probs[i]] == ids.tolist()
        assert [v for _, v in own.prompt_top_log_probs[i]] == pytest.approx(values.tolist(), abs=TOL)
        if token in ids.tolist():  # a token among the top-N has its place there as its rank
            assert own.prompt_ranks[i] == ids.tolist().index(token) + 1
    assert max(own.prompt_ranks[1:]) > 3  # random tokens: most are far from the top


def test_prompt_top_log_probs_validated_and_sent_once(folder, cache_gib):
    with pytest.raises(ValueError, match="prompt_top_log_probs=21"):
        SamplingParams(prompt_log_probs=True, prompt_top_log_probs=21).validate()
    with pytest.raises(ValueError, match="prompt_top_log_probs=-2"):
        SamplingParams(prompt_log_probs=True, prompt_top_log_probs=-2).validate()
    assert SamplingParams(top_log_probs=5).prompt_top_n == 5
    assert SamplingParams(top_log_probs=5, prompt_top_log_probs=1).prompt_top_n == 1
    engine = make_engine(folder, cache_gib)
    seq = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=1, prompt_log_probs=True), request_id="pre")
    assert prompt_scores(seq) == {}  # nothing scored yet
    out = first_outputs(engine, [([8, 9], SamplingParams(max_new_tokens=1))])[0]
    assert out.prompt_ranks is None and out.prompt_log_probs is None  # not asked
