"""Copies of one prompt added at once (OpenAI's `n`, server/choices.py) compute the prompt once: the first copy
prefills it, the others wait for its blocks and then find them in the prefix cache."""

from __future__ import annotations

import asyncio

import pytest

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.async_engine import AsyncEngine
from llmengine_runtime.runtime.engine import Engine
from llmengine_runtime.runtime.sequence import Status

BS = 4
PROMPT = [(7 * i + 5) % 120 + 3 for i in range(5 * BS + 2)]  # 5 full blocks, then 2 tokens
REUSED = 5 * BS  # what each later copy finds cached: all full blocks (its last token stays to compute)
N = 4


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def make_engine(folder, cache_gib, enable: bool, **kwargs) -> Engine:
    return Engine(folder, device="cpu", block_size=BS, kv_cache_gib=cache_gib(folder, 64, BS),
                  enable_prefix_caching=enable, **kwargs)


def choices(params: SamplingParams) -> list[SamplingParams]:
    """n choices as server/choices.py makes them: seeds seed + i."""
    from llmengine_runtime.server.choices import choice_params

    return choice_params(params, N)


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Add every request at once, step to the end, checking the block accounting each step."""
    seqs = [engine.add_request(p, sp, request_id=f"c-{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
    while engine.has_unfinished():
        engine.step()
        engine.block_manager.check(list(engine.requests.values()))
    engine.block_manager.check([])
    assert engine.block_manager.num_used == 0
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_n_copies_compute_the_prompt_once(folder, cache_gib, temperature):
    params = choices(SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=temperature,
                                    seed=11 if temperature else None))
    want = run(make_engine(folder, cache_gib, enable=False), [PROMPT] * N, params)
    on = make_engine(folder, cache_gib, enable=True)
    got = run(on, [PROMPT] * N, params)
    assert got == want and all(len(t) == 6 for t in got)
    if temperature:
        assert len({tuple(t) for t in got}) > 1  # the seeds differ, so do the choices
    stats = on.stats()
    # the first copy: the whole prompt; each other copy: only the tokens after the cached blocks; then 5 decodes each
    assert stats["tokens_computed"] == len(PROMPT) + (N - 1) * (len(PROMPT) - REUSED) + N * 5
    assert stats["prefix_cache_hits"] == (N - 1) * REUSED and stats["prefix_cache_queries"] == N * len(PROMPT)


def test_copies_wait_for_a_chunked_prefill_and_survive_its_abort(folder, cache_gib):
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = run(make_engine(folder, cache_gib, enable=False), [PROMPT], [params])[0]
    on = make_engine(folder, cache_gib, enable=True, max_num_batched_tokens=8)  # the prompt takes 3 steps
    seqs = [on.add_request(PROMPT, params, request_id=f"c-{i}") for i in range(N)]
    on.step()
    on.block_manager.check(list(on.requests.values()))
    assert [s.num_computed_tokens for s in seqs] == [8, 0, 0, 0]  # the copies wait instead of computing it too
    assert [s.status for s in seqs[1:]] == [Status.WAITING] * 3 and not any(s.block_table for s in seqs[1:])
    on.abort("c-0")  # the first copy goes mid-prefill; its full blocks stay cached and the next copy leads
    on.abort("c-2")  # a waiting copy goes too
    on.block_manager.check(list(on.requests.values()))
    while on.has_unfinished():
        on.step()
        on.block_manager.check(list(on.requests.values()))
    on.block_manager.check([])
    assert on.block_manager.num_used == 0
    assert seqs[1].output_token_ids == seqs[3].output_token_ids == want
    # c-0 computed 8 tokens (2 blocks); c-1 reused them and computed the rest; c-3 reused all 5 full blocks
    assert on.stats()["prefix_cache_hits"] == 8 + REUSED
    assert on.stats()["tokens_computed"] == 8 + (len(PROMPT) - 8) + (len(PROMPT) - REUSED) + 2 * 3


def test_async_engine_n_requests_share_the_prompt(folder, cache_gib):
    engine = AsyncEngine(folder, device="cpu", block_size=BS, kv_cache_gib=cache_gib(folder, 64, BS))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    async def main() -> list[list[int]]:
        streams = [engine.add_request(PROMPT, p, request_id=f"req-{i}") for i, p in enumerate(choices(params))]

        async def collect(stream) -> list[int]:
            return [t async for out in stream for t in out.token_ids]

        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len({tuple(o) for o in outputs}) == 1 and len(outputs[0]) == 3
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == (N - 1) * REUSED
    assert stats["tokens_computed"] == len(PROMPT) + (N - 1) * (len(PROMPT) - REUSED) + N * 2
    engine.engine.block_manager.check([])
