"""The tokenizer's llguidance view (~1.5 s to build) is built off the event loop and off the engine's steps: while
it is built, plain requests stream, the event loop answers, a bad constraint is still refused at once, and the
guided request waits for the view and then follows its constraint."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

import llmengine_runtime.runtime.engine_guided as engine_module
import llmengine_runtime.runtime.guided_tokenizer as guided_tokenizer
from llmengine_runtime.models.config import load_config
from llmengine_runtime.models.tokenizer import Tokenizer, stop_token_ids
from llmengine_runtime.runtime import AsyncEngine, SamplingParams
from tests.models.tiny import write_tiny_llama as write_tiny

BUILD_S = 2.0  # the stub makes the build at least this slow


def tokenizer_folder(folder, default_model_dir):
    """A tiny random model with the default model's tokenizer."""
    write_tiny(folder, 49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def built_view(tmp_path_factory, default_model_dir) -> guided_tokenizer.TokenizerInfo:
    """The view of such a model's tokenizer, built once, here, outside the measured time."""
    folder = tokenizer_folder(tmp_path_factory.mktemp("prebuilt"), default_model_dir)
    tokenizer = Tokenizer.from_folder(folder)
    return guided_tokenizer.tokenizer_info(tokenizer, 49152, stop_token_ids(load_config(folder), tokenizer))


@pytest.fixture
def folder(tmp_path, default_model_dir):
    """Such a model in a fresh folder: its view is not built yet."""
    return tokenizer_folder(tmp_path / "tiny-tok", default_model_dir)


@pytest.fixture
def slow_build(monkeypatch, built_view) -> list[str]:
    """tokenizer_info, whose first build takes BUILD_S (other callers wait for it, as on the real one's lock) and
    gives the view built beforehand, so the timing is the stub's; returns the names of the threads that built."""
    builders, keys, lock = [], [], threading.Lock()

    def slow(tokenizer, vocab_size, stops):
        with lock:
            if not builders:
                builders.append(threading.current_thread().name)
                time.sleep(BUILD_S)
                key = guided_tokenizer._info_key(tokenizer, vocab_size, tuple(sorted({int(t) for t in stops})))
                guided_tokenizer._INFOS[key] = built_view
                keys.append(key)
        return guided_tokenizer.tokenizer_info(tokenizer, vocab_size, stops)

    monkeypatch.setattr(engine_module, "tokenizer_info", slow)
    yield builders
    for key in keys:
        del guided_tokenizer._INFOS[key]


async def collect(stream, name: str, events: list[tuple[float, str]]) -> tuple[str, str | None]:
    """(text, finish reason), noting the time of each delta that carries tokens."""
    text, reason = [], None
    async for out in stream:
        if out.token_ids:
            events.append((time.perf_counter(), name))
        text.append(out.text)
        reason = out.finish_reason
    return "".join(text), reason


async def ticks(stop: asyncio.Event, gaps: list[float]) -> None:
    """How long the event loop takes to come back to a 10 ms sleep."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


@pytest.mark.slow
def test_plain_requests_stream_while_the_guided_view_is_built(folder, slow_build):
    engine = AsyncEngine(folder, kv_cache_gib=0.01, device="cpu")
    guided = SamplingParams(max_new_tokens=8, guided=("choice", ["small", "large"]))
    plain = SamplingParams(max_new_tokens=8, ignore_eos=True)

    async def main() -> dict:
        engine.start()  # the view's build starts on its own thread
        started = time.perf_counter()
        guided_stream = engine.add_request("The size is", guided)
        add_s = time.perf_counter() - started
        with pytest.raises(ValueError, match="invalid regex"):  # validated at once, without the view
            engine.add_request("x", SamplingParams(guided=("regex", "(ab")))
        events: list[tuple[float, str]] = []
        gaps: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticks(stop, gaps))
        (guided_text, guided_reason), (_, plain_reason) = await asyncio.gather(
            collect(guided_stream, "guided", events), collect(engine.add_request("Hello", plain), "plain", events))
        stop.set()
        await ticker
        return {"add_s": add_s, "events": events, "gaps": gaps, "started": started, "guided_text": guided_text,
                "guided_reason": guided_reason, "plain_reason": plain_reason}

    try:
        r = asyncio.run(main())
    finally:
        engine.shutdown()
    assert slow_build == [f"guided-view-{engine.name}"]  # built once, on its own thread
    assert r["add_s"] < BUILD_S / 4  # add_request did not wait for the view
    plain_times = [t for t, name in r["events"] if name == "plain"]
    guided_times = [t for t, name in r["events"] if name == "guided"]
    assert r["plain_reason"] == "length" and len(plain_times) >= 1
    assert max(plain_times) < min(guided_times)  # the plain request streamed to its end meanwhile
    assert min(guided_times) - r["started"] >= BUILD_S * 0.9  # the guided one waited for the view
    assert r["guided_text"] in ("small", "large") and r["guided_reason"] == "stop"
    assert max(r["gaps"]) < BUILD_S / 2, f"the event loop stalled for {max(r['gaps']):.2f} s"
    assert not engine._streams


@pytest.mark.slow  # a 2 s build
def test_a_guided_request_left_while_the_view_is_built_leaves_nothing(folder, slow_build):
    engine = AsyncEngine(folder, kv_cache_gib=0.01, device="cpu")

    async def main() -> None:
        stream = engine.add_request("The size is", SamplingParams(max_new_tokens=4, guided=("choice", ["a", "b"])),
                                    request_id="gone")
        task = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.2)
        task.cancel()  # the client leaves while its matcher waits for the view
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        assert "gone" not in engine._streams
        # the same id can be used again, and now runs (after the view is built)
        text, reason = await collect(engine.add_request("The size is", SamplingParams(
            max_new_tokens=4, guided=("choice", ["a", "b"])), request_id="gone"), "again", [])
        assert text in ("a", "b") and reason == "stop"

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert not engine._streams and not engine.engine.requests
    engine.engine.block_manager.check([])
