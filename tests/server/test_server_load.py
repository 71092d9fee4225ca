"""Many clients at once against the real runtime: concurrent streams complete and correct, and clients that
go away free their KV blocks at once."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
from live_server import MODEL, llm_body, wait_for

SYNC = f"/v1/llm/completions-sync?model_endpoint_name={MODEL}"
STREAM = f"/v1/llm/completions-stream?model_endpoint_name={MODEL}"
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def idle(engine) -> bool:
    stats = engine.stats()
    return stats["blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_32_concurrent_streams_equal_their_sync_results(llm_server):
    prompts = [f"Here is fact number {i} about the sea:" for i in range(32)]

    async def sync(client, prompt):
        r = await client.post(SYNC, json=llm_body(prompt, max_new_tokens=6))
        assert r.status_code == 200, r.text
        return r.json()["output"]

    async def stream(client, prompt):
        r = await client.post(STREAM, json=llm_body(prompt, max_new_tokens=6))
        assert r.status_code == 200, r.text
        assert re.fullmatch(r"(data: \{[^\n]*\}\n\n)+", r.text)
        return [json.loads(line[len("data: "):])["output"] for line in r.text.split("\n") if line]

    async def run():
        async with httpx.AsyncClient(base_url=llm_server.url, timeout=120, limits=LIMITS) as client:
            syncs = await asyncio.gather(*(sync(client, p) for p in prompts))
            streams = await asyncio.gather(*(stream(client, p) for p in prompts))
        return syncs, streams

    syncs, streams = asyncio.run(run())
    assert len({s["text"] for s in syncs}) > 1  # different prompts, different completions
    for prompt, expected, chunks in zip(prompts, syncs, streams, strict=True):
        assert "".join(c["text"] for c in chunks) == expected["text"], prompt
        assert [c["finished"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1]["num_completion_tokens"] == expected["num_completion_tokens"]
    assert wait_for(lambda: idle(llm_server.engine), timeout=5)


def generated(engine) -> int:
    return engine.stats().get("tokens_generated", 0)


def test_20_streams_disconnecting_mid_stream_free_their_blocks(llm_server):
    engine = llm_server.engine
    before = generated(engine)

    async def run():
        clients = [httpx.AsyncClient(base_url=llm_server.url, timeout=120) for _ in range(20)]
        streams = []
        try:
            requests = [client.build_request("POST", STREAM, json=llm_body(f"Tell me a long story {i}",
                                                                           max_new_tokens=400))
                        for i, client in enumerate(clients)]
            streams += await asyncio.gather(*(c.send(r, stream=True) for c, r in zip(clients, requests, strict=True)))
            for response in streams:  # each has started streaming
                lines = response.aiter_lines()
                assert (await lines.__anext__()).startswith("data: ")
                await lines.aclose()
            assert engine.stats()["blocks_used"] > 0
        finally:
            for response in streams:
                await response.aclose()  # drops the connection mid-stream
            for client in clients:
                await client.aclose()

    asyncio.run(run())
    # 20 x 400 tokens would take minutes: idle within seconds means every request was aborted
    assert wait_for(lambda: idle(engine), timeout=5), engine.stats()
    assert wait_for(lambda: not llm_server.state.jobs, timeout=2)
    assert generated(engine) - before < 20 * 400 / 2  # stopped early, not run to the end


def test_sync_client_that_gives_up_frees_its_blocks(llm_server):
    engine = llm_server.engine
    before = generated(engine)
    try:
        httpx.post(llm_server.url + SYNC, json=llm_body("Write a very long essay", max_new_tokens=400), timeout=1.5)
        raise AssertionError("400 tokens in 1.5 s: the test cannot tell an abort from a finish")
    except httpx.ReadTimeout:
        pass
    assert wait_for(lambda: idle(engine), timeout=3), engine.stats()
    assert generated(engine) - before < 400
    r = httpx.post(llm_server.url + SYNC, json=llm_body(max_new_tokens=1), timeout=60)
    assert r.status_code == 200
