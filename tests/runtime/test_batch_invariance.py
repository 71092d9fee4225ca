"""Same request, same numbers: a sequence's greedy tokens and their log-probs are bit-identical (`==`) whatever the
other sequences in its steps, its row, how its prompt was chunked, whether its prefix came from the cache, whether it
was preempted and recomputed, whether n-gram or draft-model speculation verified it, and the thread count.

This holds where every op of the step reduces each row in an order that depends on the row alone: quantized Llamas
and Falcons on our C++ CPU kernels (int4/int8 products, norms, rotary, paged attention in fixed key chunks; the
fused decode step computes the same rows). Float weights still go through torch's products (oneDNN), whose blocking
may depend on the number of rows: not covered here (README, "Same request, same text")."""

from __future__ import annotations

import random

import pytest
import torch

from llmengine_runtime.runtime import SamplingParams
from tests.runtime.spec_helpers import PATTERN_PROMPTS, make_engine, run

pytestmark = pytest.mark.slow  # a dozen engines on tiny models, each generating for eight prompts

VARIANTS = [("llama-gqa-tied-bias", "int4"), ("llama-mha", "int8"), ("llama3-rope", "int4"), ("falcon-7b-like", "int4"),
            ("falcon-rw-like", "int8")]  # Falcon: multi-query and parallel blocks; ALiBi with biases
MAX_NEW = 20


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [3, 9, 17, 33, 50]
    return [[rng.randrange(3, 128) for _ in range(n)] for n in lengths] + PATTERN_PROMPTS


def generate(folder, cache_gib, quantize: str, prompt_ids: list[list[int]], threads: int = 1, order=None,
             **engine_kwargs):
    """Greedy tokens and log-probs of each prompt (in the prompts' order), the prompts added in `order`."""
    torch.set_num_threads(threads)
    kwargs = dict(num_blocks=200, quantize=quantize, enable_prefix_caching=False, max_num_batched_tokens=2048)
    kwargs.update(engine_kwargs)
    engine = make_engine(folder, cache_gib, **kwargs)
    order = list(range(len(prompt_ids))) if order is None else order
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, return_token_log_probs=True)
    results = run(engine, [prompt_ids[i] for i in order], params)
    torch.set_num_threads(1)
    by_prompt = {i: (r.token_ids, r.log_probs) for i, r in zip(order, results)}
    return [by_prompt[i] for i in range(len(prompt_ids))], engine


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{v}-{q}" for v, q in VARIANTS])
def case(request, tiny_dir, cache_gib):
    variant, quantize = request.param
    folder = tiny_dir(variant)
    ids = prompts()
    alone = [generate(folder, cache_gib, quantize, [p])[0][0] for p in ids]
    for tokens, log_probs in alone:
        assert len(tokens) == MAX_NEW and len(log_probs) == MAX_NEW
    return folder, quantize, ids, alone


def test_batched_in_any_order(case, cache_gib):
    folder, quantize, ids, alone = case
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    assert generate(folder, cache_gib, quantize, ids, order=order)[0] == alone


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill(case, cache_gib, chunk):
    folder, quantize, ids, alone = case
    assert generate(folder, cache_gib, quantize, ids, max_num_batched_tokens=chunk)[0] == alone


def test_prefix_from_the_cache(case, cache_gib):
    """The prompts again after a first run left their blocks in the prefix cache: the second run computes only
    each prompt's last tokens (a cache hit's remainder), yet gives the same numbers."""
    folder, quantize, ids, alone = case
    torch.set_num_threads(1)
    engine = make_engine(folder, cache_gib, num_blocks=200, quantize=quantize, enable_prefix_caching=True)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, return_token_log_probs=True)
    first = run(engine, ids, params)
    hits = engine.block_manager.stats()["prefix_cache_hits"]
    second = run(engine, ids, params)
    assert [(r.token_ids, r.log_probs) for r in first] == alone
    assert [(r.token_ids, r.log_probs) for r in second] == alone
    assert engine.block_manager.stats()["prefix_cache_hits"] > hits


def test_preempted_and_recomputed(case, cache_gib):
    """A cache too small for every sequence at once: some are preempted, and recomputed from their tokens."""
    folder, quantize, ids, alone = case
    results, engine = generate(folder, cache_gib, quantize, ids, num_blocks=24)
    assert engine.scheduler.num_preemptions > 0
    assert results == alone


def test_ngram_speculation(case, cache_gib):
    folder, quantize, ids, alone = case
    assert generate(folder, cache_gib, quantize, ids, speculative="ngram", num_speculative_tokens=3)[0] == alone


def test_two_threads(case, cache_gib):
    folder, quantize, ids, alone = case
    assert generate(folder, cache_gib, quantize, ids, threads=2)[0] == alone


def test_beside_seeded_sampled_requests(case, cache_gib):
    """Greedy requests beside sampled ones (the sampler's mixed path) keep their numbers, and a seeded sampled
    request draws the same tokens alone and in the batch (each request draws from its own generator)."""
    folder, quantize, ids, alone = case
    torch.set_num_threads(1)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7,
                             return_token_log_probs=True)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, return_token_log_probs=True)
    engine = make_engine(folder, cache_gib, num_blocks=200, quantize=quantize, enable_prefix_caching=False)
    (sampled_alone,) = run(engine, [ids[3]], sampled)
    mixed = run(engine, ids + [ids[3]], [greedy] * len(ids) + [sampled])
    assert [(r.token_ids, r.log_probs) for r in mixed[:-1]] == alone
    assert (mixed[-1].token_ids, mixed[-1].log_probs) == (sampled_alone.token_ids, sampled_alone.log_probs)


def test_draft_model_speculation(case, cache_gib, tiny_dir):
    """Another tiny model of the same vocabulary proposes; the target's verification keeps each row's numbers."""
    folder, quantize, ids, alone = case
    draft = tiny_dir("llama-mha" if "mha" not in str(folder) else "llama-gqa-tied-bias")
    results, engine = generate(folder, cache_gib, quantize, ids, speculative=str(draft), num_speculative_tokens=3)
    assert engine.counters["spec_proposed_tokens"] > 0
    assert results == alone
