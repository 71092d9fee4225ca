"""Guided decoding through the server, fast: a tiny random Llama with the default model's tokenizer (so
constraints compile for real) and one without a tokenizer. Bad constraints are a 400 naming the problem before
anything is queued; response_format json_schema and vLLM's guided_* fields constrain the answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from live_server import MODEL, llm_body, serve

from llmengine_runtime.runtime import AsyncEngine
from llmengine_runtime.server.app import create_app
from tests.models.tiny import write_tiny_llama as write_tiny

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}  # compact: a random model cannot pad with blanks


@pytest.fixture(scope="module")
def guided_server(tmp_path_factory, default_model_dir: Path):
    folder = write_tiny(tmp_path_factory.mktemp("tiny-tok"), 49152)  # the default tokenizer's vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, folder / name)
    engines = {"tok": AsyncEngine(folder, name="tok", kv_cache_gib=0.01, device="cpu"),
               "notok": AsyncEngine(write_tiny(tmp_path_factory.mktemp("tiny-notok"), 128), name="notok",
                                    kv_cache_gib=0.01, device="cpu")}
    with serve(create_app(engines)) as live:
        live.engines = engines
        yield live
    for engine in engines.values():
        engine.shutdown()


def v1(live, **fields) -> httpx.Response:
    return httpx.post(live.url + "/v1/llm/completions-sync?model_endpoint_name=tok", timeout=60,
                      json=llm_body(prompt="Answer:", max_new_tokens=40, **fields))


BAD = [  # (case id, body fields, words the 400's detail must contain)
    ("json schema", {"guided_json": {"type": "nope"}}, ["invalid JSON schema", "nope"]),
    ("json not an object", {"guided_json": [1, 2]}, ["invalid JSON schema", "object"]),
    ("regex", {"guided_regex": "(cat|dog"}, ["invalid regex", "unclosed group"]),
    ("choice empty", {"guided_choice": []}, ["invalid choice", "non-empty"]),
    ("choice not strings", {"guided_choice": ["a", 3]}, ["invalid choice", "3"]),
    ("grammar", {"guided_grammar": "start: ???"}, ["invalid grammar"]),
    ("gbnf undefined rule", {"guided_grammar": "root ::= foo"}, ["invalid grammar", "foo"]),
    ("two fields", {"guided_regex": "a+", "guided_choice": ["a"]}, ["at most one", "guided_regex", "guided_choice"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_constraints_are_400_naming_the_problem(guided_server, case):
    _, fields, words = case
    r = v1(guided_server, **fields)
    assert r.status_code == 400, r.text
    assert all(w in r.json()["detail"] for w in words), r.json()["detail"]
    stats = guided_server.engines["tok"].stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["blocks_used"] == 0


def test_openai_routes_refuse_bad_constraints(guided_server):
    url = guided_server.url
    cases = [("/v1/completions", {"prompt": "a", "guided_regex": "a("}, "invalid regex"),
             ("/v1/completions", {"prompt": "a", "guided_choice": ["a"], "response_format": {"type": "json_object"}},
              "at most one"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
              "json_schema.schema"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "response_format": {"type": "xml"}}, "response_format type 'xml'"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "guided_json": {"type": "object", "properties": 5}}, "invalid JSON schema")]
    for path, body, words in cases:
        r = httpx.post(url + path, json={"model": "tok", "max_tokens": 4, **body}, timeout=60)
        assert r.status_code == 400, (path, body, r.text)
        assert words in r.json()["error"]["message"], r.json()


def test_guided_on_a_model_without_a_tokenizer_is_400(guided_server):
    r = httpx.post(guided_server.url + "/v1/completions", timeout=60,
                   json={"model": "notok", "prompt": [1, 2, 3], "max_tokens": 4, "guided_regex": "a+"})
    assert r.status_code == 400, r.text
    assert "guided decoding needs a tokenizer" in r.json()["error"]["message"]
    r = httpx.post(guided_server.url + "/v1/completions", timeout=60,  # the same without a constraint serves
                   json={"model": "notok", "prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_chat_response_format_json_schema_is_followed(guided_server):
    r = httpx.post(guided_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tok", "messages": [{"role": "user", "content": "a shirt"}], "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "shirt", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert choice["finish_reason"] == "stop"


def test_text_response_format_and_guided_fields_on_completions(guided_server):
    url = guided_server.url
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "tok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "tok", "prompt": "Pick:", "max_tokens": 10, "temperature": 0.8, "seed": 3, "n": 3,
        "guided_choice": ["alpha", "beta gamma"]})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] and \
        all(c["text"] in ("alpha", "beta gamma") and c["finish_reason"] == "stop" for c in r.json()["choices"])


def test_llm_engine_route_follows_each_kind(guided_server):
    checks = [({"guided_regex": "(yes|no), [0-9]{2}"}, lambda t: t in {f"{w}, {n:02d}" for w in ("yes", "no")
                                                                       for n in range(100)}),
              ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
              ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
              ({"guided_grammar": '?start: "SELECT " COL " FROM t"\nCOL: "a" | "b"'},
               lambda t: t in ("SELECT a FROM t", "SELECT b FROM t"))]
    for fields, valid in checks:
        r = v1(guided_server, **fields)
        assert r.status_code == 200, r.text
        text = r.json()["output"]["text"]
        assert valid(text), (fields, text)
    assert guided_server.engines["tok"].stats()["blocks_used"] == 0


OFFICIAL = Path(__file__).resolve().parents[2] / ".venv" / "official-client"


@pytest.mark.skipif(not (OFFICIAL / "llmengine").is_dir(), reason=f"the official client is not in {OFFICIAL}")
def test_official_client_guided_fields(llm_server):
    """The official client, unchanged, in a subprocess: all four guided fields against the default model."""
    env = {**os.environ, "PYTHONPATH": str(OFFICIAL), "LLM_ENGINE_BASE_PATH": llm_server.url + "/",
           "LLM_ENGINE_DISABLE_VERSION_CHECK": "true"}
    env.pop("SCALE_API_KEY", None)
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(here / "official_client_guided_check.py"), MODEL], env=env,
                          capture_output=True, text=True, timeout=300, cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["client_file"].startswith(str(OFFICIAL))
    shirt = {"type": "object", "additionalProperties": False, "required": ["color", "size"],
             "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}}
    for text in (got["json"], got["async_json"]):
        jsonschema.validate(json.loads(text), shirt)
    assert got["async_json"] == got["json"]
    assert re.fullmatch(r"(cat|dog)s? (are|is) (cute|loud)", got["regex"]) and got["regex_stream"] == got["regex"]
    assert got["choice"] in ("Paris", "London", "Berlin") and got["async_choice_stream"] == got["choice"]
    assert re.fullmatch(r"SELECT (id|name) FROM (users|orders)", got["grammar"])
    assert got["invalid"] == "BadRequestError"
    assert llm_server.engine.stats()["blocks_used"] == 0
