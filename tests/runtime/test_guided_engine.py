"""Guided decoding in the engine, on the default model: every constraint of a varied set is followed and ends
with "stop", unguided requests batched beside guided ones are untouched, speculation (n-gram) keeps the output
valid, preemption resumes a matcher where it was, and every KV block comes back."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine
from tests.runtime.spec_helpers import run, spec_stats

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "address"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
SHIRT = {"type": "object", "additionalProperties": False, "required": ["color", "size"],
         "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}}
SCORES = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4}
TAGS = {"type": "object", "additionalProperties": False, "required": ["tags", "ok"],
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1,
                                "maxItems": 3},
                       "ok": {"type": "boolean"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
SQL = r"""
?start: query
query: "SELECT " cols " FROM " table where?
cols: col | col ", " col | col ", " col ", " col
col: "id" | "name" | "age"
table: "users" | "orders"
where: " WHERE " col " = " NUMBER
NUMBER: /[0-9]{1,3}/
"""
SQL_REGEX = r"SELECT (id|name|age)(, (id|name|age)){0,2} FROM (users|orders)( WHERE (id|name|age) = [0-9]{1,3})?"
GBNF = 'root ::= "The answer is " [0-9] [0-9]? "."'


def json_check(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema) is None


def regex_check(pattern):
    return lambda text: re.fullmatch(pattern, text) is not None


# (prompt, (kind, spec), check of the output text)
CASES = [
    ('Ann lives in Oslo, zip 01234. As JSON: {"name": "Ann", "address": {"city": "Oslo", "zip": "01234"}}\n'
     "Bob lives in Rome, zip 00100. As JSON:", ("json", PERSON), json_check(PERSON)),
    ("A large blue shirt, as JSON:", ("json", SHIRT), json_check(SHIRT)),
    ("Three test scores as a JSON array:", ("json", json.dumps(SCORES)), json_check(SCORES)),
    ("A photo of a beach, tagged, as JSON:", ("json", TAGS), json_check(TAGS)),
    ("The pets:", ("regex", r"(cat|dog|bird)s? (are|is) (cute|loud)"),
     regex_check(r"(cat|dog|bird)s? (are|is) (cute|loud)")),
    ("Today's date is", ("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
     regex_check(r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")),
    ("Contact address:", ("regex", r"[a-z]{1,8}@(example|test)\.(com|org)"),
     regex_check(r"[a-z]{1,8}@(example|test)\.(com|org)")),
    ("The capital of France is", ("choice", ["Paris", "London", "Berlin"]),
     lambda text: text in ("Paris", "London", "Berlin")),
    ("Is the sky green? Answer:", ("choice", ["yes", "no", "maybe"]), lambda text: text in ("yes", "no", "maybe")),
    ("The SQL query that lists the names of all users:", ("grammar", SQL), regex_check(SQL_REGEX)),
    ("What is 6 times 7?", ("grammar", GBNF), regex_check(r"The answer is [0-9]{1,2}\.")),
    ("Shirt order 1, as JSON: {\"color\": \"red\", \"size\": \"M\"}\nShirt order 2, as JSON:", ("json", SHIRT),
     json_check(SHIRT)),
]
UNGUIDED = ["The sky is blue because", "Suggest a name for an icecream shop", "1. apple\n2. banana\n3."]


@pytest.fixture(scope="module")
def engine(default_model_dir) -> Engine:
    """n-gram speculation on; requests opt out with speculate=False, so one engine serves both kinds."""
    return Engine(default_model_dir, device="cpu", kv_cache_gib=0.25, max_num_batched_tokens=512,
                  enable_prefix_caching=False, speculative="ngram")


def guided_params(speculate: bool, **kwargs) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=64, guided=guided, speculate=speculate, **kwargs) for _, guided, _ in CASES]


def check_all(results) -> None:
    for (_, guided, valid), result in zip(CASES, results):
        assert result.finish_reason == "stop", (guided, result.text)
        assert valid(result.text), (guided, result.text)


def test_each_constraint_is_followed_beside_unguided_requests(engine):
    plain = SamplingParams(max_new_tokens=24, speculate=False)
    alone = run(engine, UNGUIDED, plain)
    prompts = [c[0] for c in CASES] + UNGUIDED
    mixed = run(engine, prompts, guided_params(False) + [plain] * len(UNGUIDED))
    check_all(mixed[:len(CASES)])
    assert [r.token_ids for r in mixed[len(CASES):]] == [r.token_ids for r in alone]
    assert [r.text for r in mixed[len(CASES):]] == [r.text for r in alone]


def test_speculation_keeps_guided_output_valid(engine):
    before = spec_stats(engine)
    greedy = run(engine, [c[0] for c in CASES], guided_params(True))
    check_all(greedy)
    proposed, accepted, _ = (a - b for a, b in zip(spec_stats(engine), before))
    assert accepted > 0 and proposed > accepted  # proposals were made, some accepted and some cut by the masks
    sampled = run(engine, [c[0] for c in CASES], guided_params(True, temperature=0.9, seed=7))
    check_all(sampled)


def test_preempted_guided_requests_resume_their_matchers(engine, default_model_dir, cache_gib):
    """A cache too small for the batch: sequences are preempted and recomputed from prompt + outputs, their
    matchers (which consumed the outputs) carrying on; outputs stay valid and equal to the roomy run's."""
    roomy = run(engine, [c[0] for c in CASES[:6]], guided_params(False)[:6])
    tight = Engine(default_model_dir, device="cpu", kv_cache_gib=cache_gib(default_model_dir, 8, 16),
                   enable_prefix_caching=False, max_num_batched_tokens=128)
    got = run(tight, [c[0] for c in CASES[:6]], guided_params(False)[:6])
    assert tight.stats()["num_preemptions"] > 0
    for (_, guided, valid), result, want in zip(CASES, got, roomy):
        assert result.finish_reason == "stop" and valid(result.text), (guided, result.text)
        assert result.token_ids == want.token_ids
