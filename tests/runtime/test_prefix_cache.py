"""Prefix caching in the block manager and the scheduler, without a model.

A fake "KV" oracle stands in for the cache contents: computing position p of a sequence writes the
sequence's whole token prefix up to p into that slot, which is exactly what real K/V depends on. A
sequence is correct when every computed slot it points at holds its own prefix.
"""

from __future__ import annotations

import random

import pytest

import llmengine_runtime.runtime.block_manager as block_manager
from llmengine_runtime.runtime.block_manager import BlockManager, block_hash
from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.scheduler import Scheduler
from llmengine_runtime.runtime.sequence import Sequence, Status

BS = 4


def seq(tokens: list[int], request_id: str = "s", max_new_tokens: int = 4) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(max_new_tokens=max_new_tokens),
                    TextStream(None, [], [], False, True))


def admit_and_compute(bm: BlockManager, s: Sequence) -> int:
    """Admit `s` as the scheduler does, compute all its tokens and register its blocks; the hit in tokens."""
    prefix = bm.cached_prefix(s)
    bm.reuse(s, prefix)
    bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return len(prefix) * bm.block_size


def test_block_hash_is_stable_and_chained():
    assert block_hash(b"", (1, 2, 3, 4)).hex() == "087a24230771ee662be37e5493b333d7"  # the same in every process
    parent_a, parent_b = block_hash(b"", (1, 2, 3, 4)), block_hash(b"", (1, 2, 3, 5))
    assert parent_a != parent_b
    assert block_hash(parent_a, (7, 7, 7, 7)) != block_hash(parent_b, (7, 7, 7, 7))  # same tokens, other parent
    assert block_hash(parent_a, (7, 7, 7, 7)) != block_hash(parent_a, (7, 7, 7, 8))
    assert block_hash(b"", (256,)) != block_hash(b"", (1, 0))  # token ids are not bytes
    assert BlockManager(4, BS, True, "model-a:fp32").root_hash != BlockManager(4, BS, True, "model-a:bf16").root_hash


def test_longest_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq(list(range(10, 24)))  # 3 full blocks + 2 tokens
    assert admit_and_compute(bm, a) == 0
    b = seq(list(range(10, 18)) + [99, 98, 97, 96, 95])  # shares 2 blocks, then differs
    assert admit_and_compute(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and not set(b.block_table[2:]) & set(a.block_table)
    assert [bm.ref_counts[x] for x in a.block_table[:3]] == [2, 2, 1]
    c = seq([10, 11, 12, 0] + list(range(14, 24)))  # differs inside the first block: nothing to share
    assert admit_and_compute(bm, c) == 0
    assert bm.stats()["prefix_cache_queries"] == 14 + 13 + 14 and bm.stats()["prefix_cache_hits"] == 8
    bm.check([a, b, c])
    for s in (a, b, c):
        bm.free(s)
    bm.check([])
    assert bm.num_used == 0 and bm.num_free == 16 and bm.stats()["blocks_cached"] == 3 + 1 + 3  # b shares 2 of its 3


def test_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    prompt = list(range(30, 42))  # exactly 3 blocks
    admit_and_compute(bm, seq(prompt, "first"))
    again = seq(prompt, "again")
    assert len(bm.cached_prefix(again)) == 2  # floor((12 - 1) / 4): the last block is recomputed
    assert admit_and_compute(bm, again) == 8 and again.num_computed_tokens == 12
    longer = seq(prompt + [5], "longer")
    assert len(bm.cached_prefix(longer)) == 3
    assert bm.cached_prefix(seq(prompt[:4], "one-block")) == []
    assert bm.cached_prefix(seq(prompt[:5], "one-block-and-one")) == bm.cached_prefix(longer)[:1]


def test_eviction_takes_free_blocks_first_then_least_recently_freed():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    x, y = seq([1, 1, 1, 1], "x"), seq([2, 2, 2, 2], "y")
    admit_and_compute(bm, x)
    admit_and_compute(bm, y)
    x_block, y_block = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)  # evictable, oldest first: x, y
    assert bm.num_free == 6 and bm.num_used == 0 and list(bm.evictable) == [x_block, y_block]
    filler = seq(list(range(100, 116)), "filler")
    bm.allocate(filler, 16)  # the 4 never-used blocks
    assert not {x_block, y_block} & set(filler.block_table)
    one_more = seq([50] * 4, "one-more")
    bm.allocate(one_more, 4)
    assert one_more.block_table == [x_block]  # x was freed first, so it goes first
    assert bm.cached_prefix(seq([1, 1, 1, 1, 0])) == []
    assert bm.cached_prefix(seq([2, 2, 2, 2, 0])) == [y_block]
    bm.check([filler, one_more])


def test_held_blocks_are_never_evicted():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    holder = seq(list(range(8)), "holder")
    admit_and_compute(bm, holder)
    other = seq(list(range(40, 48)), "other")
    admit_and_compute(bm, other)
    bm.free(other)  # 2 evictable blocks, 2 held
    greedy = seq([9] * 12, "greedy")
    assert not bm.can_allocate(greedy, 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(greedy, 12)
    bm.allocate(greedy, 8)  # takes the 2 evictable ones
    assert not set(greedy.block_table) & set(holder.block_table)
    assert bm.cached_prefix(seq(list(range(8)) + [0])) == holder.block_table
    bm.check([holder, greedy])


def test_a_hash_collision_never_gives_a_false_hit(monkeypatch):
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: b"same digest for all")
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit_and_compute(bm, a)
    assert list(bm.cached.values()) == [a.block_table[0]]  # block 1 collided: unregistered, and so after it
    bm.check([a])
    b = seq([5, 6, 7, 8, 9, 9])  # collides with a's first block, other tokens
    assert admit_and_compute(bm, b) == 0
    c = seq([1, 2, 3, 4, 1, 2, 3, 4, 0])  # its second block has the tokens of a's first block, not its place
    assert admit_and_compute(bm, c) == 4 and c.block_table[1] != a.block_table[0]
    bm.check([a, b, c])
    for s in (a, b, c):
        bm.free(s)
    bm.check([])
    assert bm.num_used == 0


def test_a_hash_blind_to_the_parent_never_gives_a_false_hit(monkeypatch):
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: repr(tokens).encode())
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 1, 2, 3, 4, 9, 9, 9, 9, 0])
    admit_and_compute(bm, a)
    # block 1 collides with block 0 (same tokens, other place): it stays unregistered, and so does block 2
    assert list(bm.cached.values()) == [a.block_table[0]]
    bm.check([a])
    assert bm.cached_prefix(seq([1, 2, 3, 4, 1, 2, 3, 4, 0])) == a.block_table[:1]
    assert bm.cached_prefix(seq([9, 9, 9, 9, 0])) == []
    bm.free(a)
    assert a.num_hashed_blocks == 0
    bm.check([])


def test_same_prefix_computed_at_once_ends_in_shared_blocks():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a, b = seq(list(range(10)), "a"), seq(list(range(10)) + [77], "b")
    for s in (a, b):  # both admitted before either computed anything: no hit
        bm.reuse(s, bm.cached_prefix(s))
        bm.allocate(s, s.num_tokens)
    own_b = list(b.block_table)
    a.num_computed_tokens, b.num_computed_tokens = 4, 10  # b runs ahead
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] == own_b[1]  # b switched to a's block 0
    assert own_b[0] in bm.free_ids
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)  # a's block 1 equals b's registered one: a switches
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and a.num_hashed_blocks == b.num_hashed_blocks == 2
    assert [bm.ref_counts[x] for x in shared] == [2, 2] and len(bm.free_ids) == 16 - 4
    bm.check([a, b])
    bm.free(a)
    bm.free(b)
    bm.check([])
    assert bm.num_used == 0 and sorted(bm.evictable) == sorted(shared) == sorted(bm.cached.values())


def test_off_behaves_like_a_plain_pool():
    bm = BlockManager(8, BS)
    a = seq(list(range(12)))
    assert admit_and_compute(bm, a) == 0
    assert bm.cached == {} and a.num_hashed_blocks == 0
    bm.free(a)
    assert bm.cached_prefix(seq(list(range(12)))) == [] and not bm.evictable and len(bm.free_ids) == 8
    assert bm.stats() == {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "blocks_cached": 0}
    bm.check([])


def test_scheduler_budgets_only_uncached_tokens():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    warm = seq(list(range(9)), "warm")
    admit_and_compute(bm, warm)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    hit, fresh = seq(list(range(9)) + [60], "hit"), seq(list(range(70, 80)), "fresh")
    sched.add(hit)
    sched.add(fresh)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("hit", 2), ("fresh", 4)]
    assert hit.num_computed_tokens == 8 and len(hit.block_table) == 3
    bm.check([warm, *sched.running])


def test_scheduler_counts_revived_evictable_blocks_as_taken():
    # 4 blocks. `done` leaves its 2 full blocks evictable; `small` holds one block, so 3 count as free.
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    done = seq(list(range(9)), "done")
    admit_and_compute(bm, done)
    bm.free(done)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    small = seq([90, 91], "small", max_new_tokens=1)
    sched.add(small)
    assert sched.schedule() == [(small, 2)]
    small.num_computed_tokens = 2
    small.output_token_ids.append(0)
    # 8 cached + 8 new tokens: 2 new blocks "fit" the 3 free, but reusing the 2 evictable ones leaves only 1.
    big = seq(list(range(8)) + [50] * 8, "big")
    sched.add(big)
    assert sched.schedule() == [(small, 1)]
    assert big.status is Status.WAITING and big.block_table == [] and big.num_computed_tokens == 0
    assert bm.num_used == 1 and bm.stats()["prefix_cache_hits"] == 0
    bm.check(sched.running)
    sched.finish(small, "length")
    assert sched.schedule() == [(big, 8)] and big.num_computed_tokens == 8
    assert bm.stats()["prefix_cache_hits"] == 8
    bm.check(sched.running)


def check_kv(bm: BlockManager, kv: dict[int, tuple[int, ...]], s: Sequence) -> None:
    """Every computed token of `s` points at a slot that holds exactly `s`'s prefix up to that token."""
    tokens = s.token_ids(0, s.num_computed_tokens)
    for p in range(s.num_computed_tokens):
        slot = s.block_table[p // bm.block_size] * bm.block_size + p % bm.block_size
        assert kv.get(slot) == tuple(tokens[:p + 1]), f"{s.request_id}: token {p} reads foreign K/V"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("enable", [True, False])
def test_random_storm_of_admits_steps_preemptions_and_aborts(seed, enable):
    rng = random.Random(seed)
    bm = BlockManager(12, BS, enable_prefix_caching=enable)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=10)
    shared = [[rng.randrange(3, 9) for _ in range(rng.choice([4, 7, 8, 11]))] for _ in range(3)]
    kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose last token's K/V it holds
    live: list[Sequence] = []
    counts = {"preempt": 0, "abort": 0, "finish": 0}
    for op in range(400):
        r = rng.random()
        if r < 0.25 and len(live) < 8:
            prompt = rng.choice(shared) + [rng.randrange(3, 9) for _ in range(rng.randrange(0, 5))]
            s = seq(prompt or [3], f"r{op}", max_new_tokens=rng.randrange(1, 10))
            sched.add(s)
            live.append(s)
        elif r < 0.32 and live:
            s = rng.choice(live)
            sched.finish(s, "abort")
            live.remove(s)
            counts["abort"] += 1
        elif r < 0.40 and sched.running:
            s = rng.choice(sched.running)
            sched.running.remove(s)
            sched.preempt(s)
            counts["preempt"] += 1
        else:
            batch = sched.schedule()
            for s, n in batch:
                check_kv(bm, kv, s)  # a cache hit brought only the sequence's own prefix
                for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
                    block = s.block_table[p // BS]
                    assert bm.ref_counts[block] == 1 and bm.hash_of[block] is None, "writes to a shared block"
                    kv[block * BS + p % BS] = tuple(s.token_ids(0, p + 1))
            for s, n in batch:
                s.num_computed_tokens += n
                bm.cache_full_blocks(s)
            for s, _ in batch:
                check_kv(bm, kv, s)
                if s.num_computed_tokens == s.num_tokens:  # "sample" a token that depends on the tokens
                    s.output_token_ids.append(3 + sum(s.token_ids(0, s.num_tokens)[-3:]) % 4)
                    if len(s.output_token_ids) == s.params.max_new_tokens:
                        sched.finish(s, "length")
                        live.remove(s)
                        counts["finish"] += 1
        bm.check(sched.running)
    for s in list(live):
        sched.finish(s, "abort")
    bm.check([])
    assert bm.num_used == 0 and bm.num_free == 12 and not sched.has_unfinished()
    assert min(counts.values()) > 5 and sched.num_preemptions > counts["preempt"], counts
    stats = bm.stats()
    if enable:
        assert stats["prefix_cache_hits"] > stats["prefix_cache_queries"] // 5 > 0
        assert set(bm.evictable) == set(bm.cached.values())
    else:
        assert stats["prefix_cache_hits"] == stats["prefix_cache_queries"] == 0 and not bm.cached
