"""The background-thread engine: streams, aborts, deadlines, failures, shutdown, a random stress run."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from llmengine_runtime.runtime import AsyncEngine, RequestOutput, SamplingParams
from tests.reference_generate import generate


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def wait_for(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def idle(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s["num_running"] == s["num_waiting"] == s["blocks_used"] == 0


@pytest.fixture
def tiny_engine(tiny_dir, cache_gib):
    """Tiny Falcon (max_model_len 2048), 400 blocks of 4 tokens."""
    folder = tiny_dir("falcon-7b-like")
    engine = AsyncEngine(folder, block_size=4, kv_cache_gib=cache_gib(folder, 400, 4), max_num_seqs=16,
                         max_num_batched_tokens=64)
    yield engine
    engine.shutdown()


@pytest.mark.slow
def test_stream_of_deltas_on_the_default_model(default_model_dir):
    engine = AsyncEngine(default_model_dir, device="cpu", kv_cache_gib=0.05, name="smol")
    assert engine.name == "smol" and engine.tokenizer is not None and engine.max_model_len > 1000
    prompt = "Suggest a name for an icecream shop"

    async def main():
        plain = await collect(engine.add_request(prompt, SamplingParams(max_new_tokens=16,
                                                                        return_token_log_probs=True)))
        stopped = await collect(engine.add_request(prompt, SamplingParams(max_new_tokens=16,
                                                                          stop_sequences=["a wide"])))
        emoji = await collect(engine.add_request("Emoji for ice cream: 🍦, emoji for pizza:",
                                                 SamplingParams(max_new_tokens=8)))
        return plain, stopped, emoji

    try:
        plain, stopped, emoji = asyncio.run(main())
        assert "".join(d.text for d in plain) == " that's both unique and accessible to a wide range of customers."
        assert [d.num_completion_tokens for d in plain] == list(range(1, 15))
        assert all(len(d.token_ids) == 1 and len(d.log_probs) == 1 for d in plain)
        assert [d.finished for d in plain] == [False] * 13 + [True] and plain[-1].finish_reason == "stop"
        assert all(d.num_prompt_tokens == plain[0].num_prompt_tokens > 0 for d in plain)
        want, text = " that's both unique and accessible to ", ""
        for d in stopped:
            text += d.text
            assert want.startswith(text), "text past the stop string leaked"
        assert text == want and stopped[-1].finish_reason == "stop"
        # Emoji are several byte-level tokens each: no delta may carry a broken character.
        ids = [t for d in emoji for t in d.token_ids]
        assert any(engine.tokenizer.decode([t]) == "\ufffd" for t in ids), "expected split characters"
        assert all("\ufffd" not in d.text for d in emoji)
        assert "".join(d.text for d in emoji) == engine.tokenizer.decode(ids)
        # Idle means asleep: no steps run while nothing is in flight.
        steps = engine.stats()["steps"]
        time.sleep(0.2)
        assert engine.stats()["steps"] == steps and idle(engine)
    finally:
        engine.shutdown()
    assert not engine._thread.is_alive()


def test_validation_happens_before_returning(tiny_engine):
    async def main():
        with pytest.raises(ValueError, match=r"prompt \(5 tokens\) \+ max_new_tokens \(2000\) = 2005 tokens"):
            tiny_engine.add_request([5] * 5, SamplingParams(max_new_tokens=2000))
        with pytest.raises(ValueError, match="top_p"):
            tiny_engine.add_request([5], SamplingParams(top_p=0))
        with pytest.raises(ValueError, match="no tokenizer"):
            tiny_engine.add_request("text", SamplingParams())
        stream = tiny_engine.add_request([5], SamplingParams(max_new_tokens=1500, ignore_eos=True),
                                         request_id="dup")
        with pytest.raises(ValueError, match="already in flight"):
            tiny_engine.add_request([6], SamplingParams(), request_id="dup")
        tiny_engine.abort("dup")
        return await collect(stream)

    assert asyncio.run(main())[-1].finish_reason == "abort"


def test_abort_mid_generation_returns_every_block(tiny_engine):
    async def main():
        params = SamplingParams(max_new_tokens=1500, ignore_eos=True)
        deltas = []
        async for delta in tiny_engine.add_request([7] * 20, params, request_id="a"):
            deltas.append(delta)
            if len(deltas) == 3:
                assert tiny_engine.stats()["blocks_used"] > 0
                tiny_engine.abort("a")
        # A consumer that walks away aborts its request too.
        stream = tiny_engine.add_request([8] * 20, params, request_id="b")
        async for _ in stream:
            break
        await stream.aclose()
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 1500
    wait_for(lambda: idle(tiny_engine))
    assert tiny_engine.stats()["finished_abort"] == 2
    tiny_engine.engine.block_manager.check([])


def test_deadline_finishes_with_timeout(tiny_engine):
    async def main():
        params = SamplingParams(max_new_tokens=1500, ignore_eos=True)
        past = tiny_engine.add_request([9] * 4, params, deadline=time.monotonic() - 1)
        soon = tiny_engine.add_request([9] * 4, params, deadline=time.monotonic() + 0.3)
        return await asyncio.gather(collect(past), collect(soon))

    past, soon = asyncio.run(main())
    assert past[-1].finish_reason == "timeout" and past[-1].num_completion_tokens == 0
    assert soon[-1].finish_reason == "timeout" and 0 < soon[-1].num_completion_tokens < 1500
    wait_for(lambda: idle(tiny_engine))


def test_a_failing_step_or_request_does_not_stop_the_loop(tiny_engine, monkeypatch):
    runner = tiny_engine.engine.runner
    real_execute, calls = runner.execute, []

    def flaky_execute(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real_execute(batch)

    monkeypatch.setattr(runner, "execute", flaky_execute)
    real_make = tiny_engine.engine.make_sequence

    def make_sequence(prompt, params, request_id=None, deadline=None, **kwargs):
        seq = real_make(prompt, params, request_id, deadline, **kwargs)
        if request_id == "bad":
            seq.text.add = lambda token, check_stops=True: 1 / 0
        return seq

    monkeypatch.setattr(tiny_engine.engine, "make_sequence", make_sequence)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        first = await collect(tiny_engine.add_request([3, 4, 5], params))
        bad = tiny_engine.add_request([3, 4, 5], params, request_id="bad")
        good = tiny_engine.add_request([3, 4, 5], params, request_id="good")
        return first, *await asyncio.gather(collect(bad), collect(good))

    first, bad, good = asyncio.run(main())
    assert first[-1].finish_reason == "error" and "injected step failure" in first[-1].error
    assert bad[-1].finish_reason == "error" and "ZeroDivisionError" in bad[-1].error
    assert good[-1].finish_reason == "length" and good[-1].num_completion_tokens == 5
    assert [t for d in good for t in d.token_ids] == generate(tiny_engine.engine.model, [[3, 4, 5]], 5)[0]
    wait_for(lambda: idle(tiny_engine))


def test_shutdown_ends_in_flight_streams(tiny_engine):
    async def main():
        stream = tiny_engine.add_request([5] * 10, SamplingParams(max_new_tokens=1500, ignore_eos=True))
        deltas = [await stream.__anext__()]
        await asyncio.to_thread(tiny_engine.shutdown)
        deltas += [d async for d in stream]
        with pytest.raises(RuntimeError, match="shut down"):
            tiny_engine.add_request([5], SamplingParams())
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert not tiny_engine._thread.is_alive()
    assert tiny_engine.stats()["blocks_used"] == 0


@pytest.mark.slow
def test_random_stress_with_aborts_leaves_no_block_behind(tiny_dir, cache_gib):
    folder = tiny_dir("falcon-7b-like")
    engine = AsyncEngine(folder, block_size=4, kv_cache_gib=cache_gib(folder, 48, 4), max_num_seqs=16,
                         max_num_batched_tokens=48)
    rng = random.Random(0)
    requests = []
    for i in range(200):
        prompt = [rng.randrange(3, 128) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 40), ignore_eos=True)
        mode = rng.choices(["complete", "abort_after", "abort_now", "walk_away"], [60, 25, 5, 10])[0]
        requests.append((f"r{i}", prompt, params, mode, rng.randint(1, 10)))

    async def one(request_id, prompt, params, mode, k):
        await asyncio.sleep(rng.random() * 0.1)
        stream = engine.add_request(prompt, params, request_id=request_id)
        if mode == "abort_now":
            engine.abort(request_id)
        deltas = []
        async for delta in stream:
            deltas.append(delta)
            if mode == "abort_after" and len(deltas) == k:
                engine.abort(request_id)
            if mode == "walk_away" and len(deltas) == k:
                await stream.aclose()
                return None
        return deltas

    async def main():
        return await asyncio.gather(*(one(*r) for r in requests))

    try:
        results = asyncio.run(main())
        wait_for(lambda: idle(engine))
        engine.engine.block_manager.check([])
        stats = engine.stats()
        assert stats["num_preemptions"] > 0 and stats["blocks_free"] == stats["blocks_total"] == 48
        checked = 0
        for (_, prompt, params, mode, _), deltas in zip(requests, results):
            if deltas is None:
                continue
            assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
            tokens = [t for d in deltas for t in d.token_ids]
            assert deltas[-1].num_completion_tokens == len(tokens)
            if mode == "complete":
                assert deltas[-1].finish_reason == "length" and len(tokens) == params.max_new_tokens
                if checked < 20:
                    assert tokens == generate(engine.engine.model, [prompt], params.max_new_tokens)[0]
                    checked += 1
            else:
                assert deltas[-1].finish_reason in ("abort", "length")
    finally:
        engine.shutdown()


def test_final_only_requests_get_one_merged_output(tiny_engine):
    """stream=False: one output at the end, holding exactly what the streamed deltas hold together."""
    params = SamplingParams(max_new_tokens=12, return_token_log_probs=True, top_log_probs=2, prompt_log_probs=True,
                            ignore_eos=True)

    async def main():
        streamed = await collect(tiny_engine.add_request([5, 17, 99, 3], params))
        final = await collect(tiny_engine.add_request([5, 17, 99, 3], params, stream=False))
        aborted = tiny_engine.add_request([5, 17, 99, 3], SamplingParams(max_new_tokens=500, ignore_eos=True),
                                          request_id="gone", stream=False)
        tiny_engine.abort("gone")
        return streamed, final, await collect(aborted)

    streamed, final, aborted = asyncio.run(main())
    assert len(streamed) == 12 and len(final) == 1
    (out,) = final
    assert out.finished and out.finish_reason == "length" and out.num_completion_tokens == 12
    assert out.token_ids == [t for d in streamed for t in d.token_ids]
    assert out.text == "".join(d.text for d in streamed)
    assert out.log_probs == [lp for d in streamed for lp in d.log_probs]
    assert out.top_log_probs == [t for d in streamed for t in d.top_log_probs]
    assert out.prompt_log_probs == streamed[0].prompt_log_probs and out.prompt_log_probs is not None
    assert out.first_token_time is not None and out.first_token_time < time.perf_counter()
    assert all(d.first_token_time is None for d in streamed)
    assert out.token_texts == [d.text for d in streamed]  # one token per streamed delta here
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    wait_for(lambda: idle(tiny_engine))


def test_streams_on_two_event_loops_and_one_closed(tiny_engine):
    """Outputs reach each event loop in one hand-over a step, in order; a loop that closes mid-stream gets its request
    aborted (every block back) while the other loop's stream runs to its end."""
    import threading

    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    other = asyncio.new_event_loop()
    got_two = threading.Event()

    async def walk_away():
        stream = tiny_engine.add_request([5] * 12, SamplingParams(max_new_tokens=1500, ignore_eos=True),
                                         request_id="gone")
        count = 0
        async for _ in stream:
            count += 1
            if count == 2:
                got_two.set()
                await asyncio.sleep(3600)  # the loop stops under it

    other_thread = threading.Thread(target=lambda: other.run_until_complete(walk_away()), daemon=True)
    other_thread.start()
    assert got_two.wait(10)
    other.call_soon_threadsafe(other.stop)
    other_thread.join(10)
    other.close()

    async def main():
        return await collect(tiny_engine.add_request([9] * 12, params, request_id="kept"))

    deltas = asyncio.run(main())
    assert deltas[-1].finished and sum(len(d.token_ids) for d in deltas) == 40
    wait_for(lambda: idle(tiny_engine))
    assert tiny_engine.stats()["finished_abort"] == 1
    tiny_engine.engine.block_manager.check([])
