"""The wire protocol of docs/architecture.md against the real runtime serving the default model, and every bad input
getting its status while the server keeps serving."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
from live_server import MODEL, llm_body

SYNC = f"/v1/llm/completions-sync?model_endpoint_name={MODEL}"
STREAM = f"/v1/llm/completions-stream?model_endpoint_name={MODEL}"


def test_sync_stream_and_log_probs(llm_server):
    body = llm_body(max_new_tokens=6, return_token_log_probs=True, unknown_field={"ignored": True})
    r = httpx.post(llm_server.url + SYNC, json=body, timeout=60)
    assert r.status_code == 200, r.text
    sync = r.json()
    assert set(sync) == {"request_id", "output"} and sync["request_id"] == r.headers["x-request-id"]
    assert uuid.UUID(sync["request_id"]).version == 4
    out = sync["output"]
    assert set(out) == {"text", "num_prompt_tokens", "num_completion_tokens", "tokens"}
    assert out["text"].startswith(" that's both")  # what transformers continues, greedy
    assert out["num_completion_tokens"] == 6 and out["num_prompt_tokens"] > 0
    assert len(out["tokens"]) == 6 and "".join(t["token"] for t in out["tokens"]) == out["text"]
    assert all(isinstance(t["log_prob"], float) and t["log_prob"] <= 0 for t in out["tokens"])

    r = httpx.post(llm_server.url + STREAM, json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.text
    # framing: single-line `data: {json}` events, each followed by a blank line; nothing else
    assert re.fullmatch(r"(data: \{[^\n]*\}\n\n)+", raw), raw
    assert "[DONE]" not in raw and "event:" not in raw and "\nid:" not in raw
    chunks = [json.loads(line[len("data: "):]) for line in raw.split("\n") if line]
    assert all(set(c) == {"request_id", "output", "error"} and c["error"] is None for c in chunks)
    assert {c["request_id"] for c in chunks} == {r.headers["x-request-id"]}
    outs = [c["output"] for c in chunks]
    assert all(set(o) == {"text", "finished", "num_prompt_tokens", "num_completion_tokens", "token"} for o in outs)
    assert "".join(o["text"] for o in outs) == out["text"]
    assert [o["finished"] for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1]["num_completion_tokens"] == 6
    counts = [o["num_completion_tokens"] for o in outs]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert [o["token"]["log_prob"] for o in outs] == pytest.approx([t["log_prob"] for t in out["tokens"]], abs=1e-4)


def test_model_endpoints_and_health(llm_server):
    listed = httpx.get(llm_server.url + "/v1/llm/model-endpoints").json()["model_endpoints"]
    assert [e["name"] for e in listed] == [MODEL]
    one = httpx.get(f"{llm_server.url}/v1/llm/model-endpoints/{MODEL}").json()
    assert one["name"] == MODEL and one["status"] == "READY" and one["source"] == "hugging_face"
    assert one["inference_framework"] and one["max_model_len"] == llm_server.engine.max_model_len
    r = httpx.get(llm_server.url + "/v1/llm/model-endpoints/nope")
    assert r.status_code == 404 and MODEL in r.json()["detail"]
    for path in ("/healthcheck", "/healthz", "/readyz"):
        assert httpx.get(llm_server.url + path).status_code == 200
    assert httpx.get(llm_server.url + "/v1/models").json()["data"][0]["id"] == MODEL


BAD = [  # (case id, query model, body changes or raw body, status, words the detail must contain)
    ("unknown model", "nope", {}, 404, [MODEL]),
    ("no model name", None, {}, 400, ["model_endpoint_name"]),
    ("temperature > 1", MODEL, {"temperature": 1.5}, 400, ["temperature"]),
    ("temperature < 0", MODEL, {"temperature": -0.1}, 400, ["temperature"]),
    ("top_p 0", MODEL, {"temperature": 0.5, "top_p": 0.0}, 400, ["top_p"]),
    ("top_p > 1", MODEL, {"temperature": 0.5, "top_p": 1.5}, 400, ["top_p"]),
    ("top_k 0", MODEL, {"temperature": 0.5, "top_k": 0}, 400, ["top_k"]),
    ("top_k -2", MODEL, {"temperature": 0.5, "top_k": -2}, 400, ["top_k"]),
    ("presence_penalty", MODEL, {"presence_penalty": 2.5}, 400, ["presence_penalty"]),
    ("frequency_penalty", MODEL, {"frequency_penalty": -0.5}, 400, ["frequency_penalty"]),
    ("guided_json invalid", MODEL, {"guided_json": {"type": "nope"}}, 400, ["invalid JSON schema", "nope"]),
    ("guided_regex invalid", MODEL, {"guided_regex": "a("}, 400, ["invalid regex", "unclosed group"]),
    ("guided_choice empty", MODEL, {"guided_choice": []}, 400, ["invalid choice"]),
    ("guided_grammar invalid", MODEL, {"guided_grammar": "root ::= foo"}, 400, ["invalid grammar", "foo"]),
    ("two guided fields", MODEL, {"guided_regex": "a+", "guided_choice": ["a"]}, 400, ["at most one", "guided_regex"]),
    ("greedy with top_k", MODEL, {"temperature": 0, "top_k": 5}, 400, ["temperature", "top_k"]),
    ("greedy with top_p", MODEL, {"temperature": 0, "top_p": 0.9}, 400, ["top_p"]),
    ("max_new_tokens 0", MODEL, {"max_new_tokens": 0}, 400, ["max_new_tokens"]),
    ("too long for the context", MODEL, {"max_new_tokens": 100_000}, 400, ["100000", "tokens"]),
    ("malformed JSON", MODEL, b'{"prompt": "a", ', 400, ["JSON"]),
    ("not an object", MODEL, b'["a"]', 400, ["object"]),
    ("missing prompt", MODEL, {"prompt": None}, 400, ["prompt"]),
    ("prompt not a string", MODEL, {"prompt": 5}, 400, ["prompt"]),
    ("max_new_tokens a string", MODEL, {"max_new_tokens": "5"}, 400, ["max_new_tokens"]),
    ("stop_sequences not a list", MODEL, {"stop_sequences": 3}, 400, ["stop_sequences"]),
]


@pytest.mark.parametrize("route", [SYNC, STREAM], ids=["sync", "stream"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_its_status(llm_server, route, case):
    _, model, change, status, words = case
    path = route.split("?")[0] + (f"?model_endpoint_name={model}" if model else "")
    if isinstance(change, bytes):
        r = httpx.post(llm_server.url + path, content=change, headers={"content-type": "application/json"})
    else:
        body = {k: v for k, v in llm_body(**change).items() if not (k == "prompt" and v is None)}
        r = httpx.post(llm_server.url + path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail
    assert r.headers["x-request-id"]


def test_serves_normally_after_bad_inputs(llm_server):
    r = httpx.post(llm_server.url + SYNC, json=llm_body(max_new_tokens=2), timeout=60)
    assert r.status_code == 200 and r.json()["output"]["num_completion_tokens"] == 2
    stats = llm_server.engine.stats()
    assert stats["blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not llm_server.state.jobs


def test_body_over_the_default_limit_is_413(llm_server):
    r = httpx.post(llm_server.url + SYNC, json=llm_body(prompt="a " * 600_000))
    assert r.status_code == 413
    assert httpx.get(llm_server.url + "/healthz").status_code == 200
