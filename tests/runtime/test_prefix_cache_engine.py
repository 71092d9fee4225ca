"""Prefix caching end to end on a tiny random Llama: the same greedy tokens as without it, fewer tokens
computed, and every block returned."""

from __future__ import annotations

import random

import pytest

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine

BS = 4
PREFIX_BLOCKS = 5


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def make_engine(folder, cache_gib, enable: bool, num_blocks: int = 64, **kwargs) -> Engine:
    return Engine(folder, device="cpu", block_size=BS, kv_cache_gib=cache_gib(folder, num_blocks, BS),
                  enable_prefix_caching=enable, **kwargs)


def shared_prefix_prompts(seed: int, num_prefixes: int, per_prefix: int, prefix_len: int) -> list[list[int]]:
    """Groups of prompts that share a prefix; within a group the suffixes differ from their first token."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prefixes):
        prefix = [rng.randrange(3, 128) for _ in range(prefix_len)]
        firsts = rng.sample(range(3, 128), per_prefix)
        prompts += [prefix + [first] + [rng.randrange(3, 128) for _ in range(rng.randrange(1, 8))] for first in firsts]
    return prompts


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, steps_between: int = 0) -> list[list[int]]:
    """Generate, adding the prompts `steps_between` steps apart (0: all at once); check the blocks every step."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:
            i, prompt = pending.pop(0)
            tokens[engine.add_request(prompt, params, request_id=f"p{i}").request_id] = []
            if steps_between == 0:
                continue
        for _ in range(max(steps_between, 1)):
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            engine.block_manager.check(list(engine.requests.values()))
    engine.block_manager.check([])
    assert engine.block_manager.num_used == 0
    return [tokens[f"p{i}"] for i in range(len(prompts))]


def generate_one_at_a_time(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, list]:
    """Outputs and tokens computed, one request after another."""
    outputs, computed = [], []
    for prompt in prompts:
        before = engine.counters["tokens_computed"]
        outputs += run(engine, [prompt], params)
        computed.append(engine.counters["tokens_computed"] - before)
    return outputs, computed


def test_one_after_another_reuses_the_shared_prefix(folder, cache_gib):
    prompts = shared_prefix_prompts(seed=0, num_prefixes=1, per_prefix=4, prefix_len=PREFIX_BLOCKS * BS + 2)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    off = make_engine(folder, cache_gib, enable=False)
    want, computed_off = generate_one_at_a_time(off, prompts, params)
    on = make_engine(folder, cache_gib, enable=True)
    got, computed_on = generate_one_at_a_time(on, prompts, params)
    assert got == want and all(len(t) == 8 for t in got)
    assert computed_off == [len(p) + 7 for p in prompts]  # the prompt, then each fed-back token but the last
    assert computed_on == [computed_off[0]] + [len(p) - PREFIX_BLOCKS * BS + 7 for p in prompts[1:]]
    stats = on.stats()
    assert stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert stats["prefix_cache_hits"] == (len(prompts) - 1) * PREFIX_BLOCKS * BS
    assert stats["blocks_cached"] > PREFIX_BLOCKS and stats["blocks_used"] == 0
    assert off.stats()["prefix_cache_queries"] == off.stats()["blocks_cached"] == 0

    # The same prompts again: now each finds its own whole prompt (but its last block) cached.
    before = on.counters["tokens_computed"]
    assert run(on, prompts, params) == want
    assert on.counters["tokens_computed"] - before == sum(len(p) - (len(p) - 1) // BS * BS + 7 for p in prompts)


def test_concurrent_requests_wait_for_and_share_their_prefix(folder, cache_gib):
    prompts = shared_prefix_prompts(seed=1, num_prefixes=2, per_prefix=3, prefix_len=PREFIX_BLOCKS * BS + 1)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    want = run(make_engine(folder, cache_gib, enable=False), prompts, params)
    on = make_engine(folder, cache_gib, enable=True)
    seqs = [on.add_request(prompt, params) for prompt in prompts]
    on.step()  # the first prompt of each prefix computes it; the others wait for its blocks (prefix_sharing.py)
    on.block_manager.check(seqs)
    assert [s.num_computed_tokens > 0 for s in seqs] == [True, False, False] * 2
    assert seqs[0].block_table[0] != seqs[3].block_table[0]
    on.step()  # now they find the prefix cached
    on.block_manager.check(seqs)
    for group in (seqs[:3], seqs[3:]):
        assert len({tuple(s.block_table[:PREFIX_BLOCKS]) for s in group}) == 1
    assert on.stats()["blocks_used"] == sum(-(-len(p) // BS) for p in prompts) - 2 * 2 * PREFIX_BLOCKS
    while on.has_unfinished():
        on.step()
        on.block_manager.check(list(on.requests.values()))
    assert [s.output_token_ids for s in seqs] == want
    assert on.stats()["prefix_cache_hits"] == 4 * PREFIX_BLOCKS * BS and on.stats()["blocks_used"] == 0


def test_preemption_with_shared_prefixes_changes_no_token(folder, cache_gib):
    # 20 blocks of 4 = 80 tokens for 12 requests of up to 12 + 8 + 12 tokens each
    prompts = shared_prefix_prompts(seed=2, num_prefixes=3, per_prefix=4, prefix_len=12)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    kwargs = dict(num_blocks=20, max_num_seqs=12, max_num_batched_tokens=32)
    off = make_engine(folder, cache_gib, enable=False, **kwargs)
    want = run(off, prompts, params, steps_between=2)
    on = make_engine(folder, cache_gib, enable=True, **kwargs)
    assert on.block_manager.num_blocks == 20
    assert run(on, prompts, params, steps_between=2) == want
    stats = on.stats()
    assert stats["num_preemptions"] > 0 and off.stats()["num_preemptions"] > 0
    assert stats["prefix_cache_hits"] > 0
    assert stats["tokens_computed"] < off.stats()["tokens_computed"]
