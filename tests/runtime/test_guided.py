"""runtime.guided: constraints compile or refuse, a random "model" masked by them always produces valid text,
stop tokens only where the constraint is complete, and the batched mask leaves unguided rows untouched."""

from __future__ import annotations

import ast
import json
import random
import re

import jsonschema
import pytest
import torch

from llmengine_runtime.models.config import load_config
from llmengine_runtime.models.tokenizer import Tokenizer, stop_token_ids
from llmengine_runtime.runtime.guided import (
    GuidedDecodingError,
    apply_token_masks,
    compile_constraint,
    guided_spec,
)
from llmengine_runtime.runtime.guided_tokenizer import tokenizer_info

EXTRA_COLUMNS = 40  # the logits are wider than the tokenizer (and not a multiple of 32): never allowed


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_folder(default_model_dir)


@pytest.fixture(scope="module")
def info(default_model_dir, tokenizer):
    config = load_config(default_model_dir)
    return tokenizer_info(tokenizer, config.vocab_size + EXTRA_COLUMNS, stop_token_ids(config, tokenizer))


@pytest.fixture(scope="module")
def closer_bias(tokenizer, info) -> torch.Tensor:
    """The test model's only preference: tokens that close a string, group, object or array, and the stop tokens,
    so that random walks through unbounded strings end within a few hundred tokens."""
    bias = torch.zeros(info.vocab_size)
    for i in range(tokenizer.vocab_size):  # byte-level pieces spell these four characters as themselves
        if any(c in tokenizer.id_to_token(i) for c in '"})]'):
            bias[i] = 6.0
    bias[list(info.stop_token_ids)] = 6.0
    return bias


def generate(constraint, tokenizer, bias, seed: int, max_tokens: int = 400) -> str:
    """Random logits, masked by the constraint, then sampled; until a stop token or the constraint is done."""
    gen = torch.Generator().manual_seed(seed)
    matcher, out = constraint.matcher(), []
    for _ in range(max_tokens):
        logits = torch.randn(1, bias.shape[0], generator=gen) + bias
        apply_token_masks(logits, [matcher])
        token = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen))
        if token in constraint.info.stop_token_ids:
            assert matcher.is_accepting(), "a stop token was allowed before the constraint was complete"
            break
        matcher.advance(token)
        out.append(token)
        if matcher.is_finished():
            break
    else:
        pytest.fail(f"not finished after {max_tokens} tokens: {tokenizer.decode(out)!r}")
    return tokenizer.decode(out)


def check_json(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema)


def check_regex(pattern):
    def check(text):
        assert re.fullmatch(pattern, text), text
    return check


CHOICES = ['a"b', "back\\slash", "new\nline", "(x|y)*", "ünï 🎉", ".+?", "[", "a", "ab", "{json}"]
NAME = r"[a-z_][a-z0-9_]{0,9}"
SQL = f"""?start: select
select: "SELECT " cols " FROM " NAME (" WHERE " cond)? ";"?
cols: "*" | NAME (", " NAME)*
cond: NAME " = " INT
NAME: /{NAME}/
%import common.INT
"""
SQL_RE = rf"SELECT (\*|{NAME}(, {NAME})*) FROM {NAME}( WHERE {NAME} = [0-9]+)?;?"
ARITHMETIC = """?start: expr
?expr: term (("+" | "-") term)*
?term: factor (("*" | "/") factor)*
?factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}|0/
"""
GBNF = """root ::= "SELECT " column " FROM " table " WHERE " column " = " number
column ::= "col_1" | "col_2"
table ::= "table_1" | "table_2"
number ::= [1-9] [0-9]?
"""

CASES = {
    "nested-object": ("json", {
        "type": "object", "additionalProperties": False, "required": ["user", "active"],
        "properties": {
            "user": {"type": "object", "additionalProperties": False, "required": ["name", "id"],
                     "properties": {"name": {"type": "string", "maxLength": 10}, "id": {"type": "integer"}}},
            "active": {"type": "boolean"}}}),
    "enums": ("json", {
        "type": "object", "additionalProperties": False, "required": ["color", "size"],
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, None, "XL"]}}}),
    "array-bounds": ("json", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                              "minItems": 2, "maxItems": 4}),
    "number-bounds": ("json", {
        "type": "object", "additionalProperties": False, "required": ["t", "n"],
        "properties": {"t": {"type": "number", "minimum": -10.5, "maximum": 40},
                       "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 100}}}),
    "pattern": ("json", {
        "type": "object", "additionalProperties": False, "required": ["zip", "code"],
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"}}}),
    "array-of-anyof": ("json", {"type": "array", "maxItems": 3, "items": {
        "anyOf": [{"type": "string", "maxLength": 5}, {"type": "boolean"},
                  {"type": "object", "properties": {"k": {"type": "null"}}, "required": ["k"],
                   "additionalProperties": False}]}}),
    "json-object": ("json", {"type": "object"}),
    "regex-alternation": ("regex", r"(cat|dog|bird)s? [0-9]{1,3}( (kg|lb))?"),
    "regex-email": ("regex", r"[a-z]{1,8}\.?[a-z]{0,4}@(example|test)\.(com|org)"),
    "choice-special": ("choice", CHOICES),
    "grammar-sql": ("grammar", SQL),
    "grammar-arithmetic": ("grammar", ARITHMETIC),
    "grammar-gbnf": ("grammar", GBNF),
}


def checker(name: str, kind: str, spec):
    if kind == "json":
        return check_json(spec)
    if kind == "regex":
        return check_regex(spec)
    if kind == "choice":
        return lambda text: text in spec or pytest.fail(f"{text!r} is not a choice")
    return {"grammar-sql": check_regex(SQL_RE),
            "grammar-gbnf": check_regex(r"SELECT col_[12] FROM table_[12] WHERE col_[12] = [1-9][0-9]?"),
            "grammar-arithmetic": lambda text: ast.parse(text, mode="eval")}[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_random_model_gives_valid_text(name, info, tokenizer, closer_bias):
    kind, spec = CASES[name]
    constraint = compile_constraint(kind, spec, info)
    check = checker(name, kind, spec)
    texts = {generate(constraint, tokenizer, closer_bias, seed) for seed in range(4)}
    for text in texts:
        check(text)
    if kind != "choice" and name != "json-object":  # the walks differ: the constraint is not a single string
        assert len(texts) > 1, texts


def test_constraints_accept_what_they_should(info, tokenizer):
    """The constraints are not too strict either: known-good texts, tokenized as the model would, pass."""
    good = {
        "nested-object": '{"user": {"name": "Ann", "id": 7}, "active": true}',
        "enums": '{"color": "green", "size": null}',
        "json-object": '{\n  "a": [1, 2.5, {"b": null}],\n  "c": "x"\n}',
        "regex-alternation": "dogs 42 kg",
        "grammar-sql": "SELECT id, name FROM users WHERE id = 3;",
        "grammar-arithmetic": "(1+2)*3/(4-0)",
    }
    for name, text in good.items():
        matcher = compile_constraint(*CASES[name], info).matcher()
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert matcher.valid_prefix_len(ids) == len(ids), name
        assert matcher.advance_many(ids) == len(ids)
        assert matcher.is_accepting(), name


@pytest.mark.parametrize("choice", CHOICES)
def test_every_choice_is_reachable(choice, info, tokenizer):
    matcher = compile_constraint("choice", CHOICES, info).matcher()
    ids = tokenizer.encode(choice, add_special_tokens=False)
    assert matcher.advance_many(ids) == len(ids)
    assert matcher.is_accepting()
    if choice != "a":  # "a" is also a prefix of "ab": it may go on
        assert matcher.is_finished()


@pytest.mark.parametrize("kind, spec, message", [
    ("json", {"type": "foo"}, "invalid JSON schema: Invalid type: foo"),
    ("json", {"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ("json", {"type": "string", "format": "no-such-format"}, "Unknown format"),
    ("json", {"$ref": "#/$defs/missing"}, "does not exist"),
    ("json", "{not json", "invalid JSON schema: not JSON"),
    ("json", [1, 2], "invalid JSON schema: expected an object"),
    ("regex", "a(b|c", "invalid regex: "),
    ("regex", "(?<=a)b", "look-around"),
    ("regex", 5, "invalid regex: expected a string"),
    ("regex", "a\\", "invalid regex: the regex ends with a lone backslash"),
    ("grammar", "start: foo", 'unknown name: "foo"'),
    ("grammar", 'start "a"', "invalid grammar: "),
    ("grammar", 'start: "a"\n%import common.NOPE', "Unknown common regex"),
    ("grammar", "root ::= ( ", "invalid grammar: "),
    ("grammar", "  ", "non-empty"),
    ("choice", [], "non-empty list"),
    ("choice", ["a", ""], "non-empty string"),
    ("choice", "abc", "list"),
    ("xml", "<a/>", "unknown guided decoding kind 'xml'"),
])
def test_invalid_constraints_raise_value_error(kind, spec, message, info):
    with pytest.raises(ValueError) as raised:
        compile_constraint(kind, spec, info)
    assert message in str(raised.value)
    if message.endswith(": "):  # the library's reason follows
        assert len(str(raised.value)) > len(message) + 5


def test_stop_tokens_only_where_complete(info, tokenizer):
    matcher = compile_constraint("regex", "[a-z]{2,4}", info).matcher()
    stops = set(info.stop_token_ids)
    letters = [tokenizer.token_to_id(c) for c in "abcd"]
    assert not stops & set(matcher.allowed_token_ids())
    matcher.advance(letters[0])
    assert not stops & set(matcher.allowed_token_ids()) and not matcher.is_accepting()
    matcher.advance(letters[1])  # "ab": complete, may go on
    allowed = set(matcher.allowed_token_ids())
    assert stops <= allowed and letters[2] in allowed
    assert matcher.is_accepting() and not matcher.is_finished()
    matcher.advance_many(letters[2:])  # "abcd": complete, nothing else fits
    assert matcher.is_finished()
    assert set(matcher.allowed_token_ids()) == stops
    matcher.advance(info.ll_tokenizer.eos_token)  # the model may still emit the stop token
    assert matcher.is_finished()


def test_regex_digits_and_words_are_ascii(info, tokenizer):
    """`\\d` is [0-9] and `\\w` [0-9a-zA-Z_], as in JSON schema (Rust's regex alone would allow "٣" or "🯸")."""
    word = "_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for pattern, chars in ((r"\d+", set("0123456789")), (r"\w+", set(word))):
        allowed = compile_constraint("regex", pattern, info).matcher().allowed_token_ids()
        texts = {tokenizer.decode([i]) for i in allowed}
        assert texts and all(text and set(text) <= chars for text in texts), sorted(texts)[:20]


def test_disallowed_tokens_are_refused(info, tokenizer):
    matcher = compile_constraint("regex", "abc[0-9]+", info).matcher()
    ids = [tokenizer.token_to_id(c) for c in "abz"]
    assert matcher.valid_prefix_len(ids) == 2
    assert matcher.advance_many(ids) == 2  # the valid prefix is consumed, the rest left
    with pytest.raises(GuidedDecodingError, match="breaks the constraint"):
        matcher.advance(tokenizer.token_to_id("z"))


def test_batched_mask_leaves_unguided_rows_bit_identical(info, tokenizer):
    vocab = info.vocab_size
    constraints = [compile_constraint("regex", "[0-9]+", info), compile_constraint("choice", CHOICES, info),
                   compile_constraint(*CASES["nested-object"], info)]
    matchers = [constraints[0].matcher(), None, constraints[1].matcher(), None, None, constraints[2].matcher()]
    matchers[0].advance(tokenizer.token_to_id("4"))
    logits = torch.randn(len(matchers), vocab, generator=torch.Generator().manual_seed(0))
    logits[1, :5] = torch.tensor([-0.0, float("inf"), float("nan"), -1e30, 0.0])
    original = logits.clone()
    apply_token_masks(logits, matchers)
    for row, matcher in enumerate(matchers):
        if matcher is None:
            assert torch.equal(logits[row].view(torch.int32), original[row].view(torch.int32))
            continue
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[matcher.allowed_token_ids()] = True
        assert torch.equal(logits[row][allowed], original[row][allowed])
        assert torch.isneginf(logits[row][~allowed]).all()
        assert not allowed[tokenizer.vocab_size:].any()  # the logits' extra columns are never allowed
    assert allowed.sum() > 0


def test_all_rows_guided_and_none_guided(info):
    matchers = [compile_constraint("regex", "x{1,3}", info).matcher() for _ in range(2)]
    logits = torch.zeros(2, info.vocab_size)
    apply_token_masks(logits, matchers)
    assert torch.equal(torch.isfinite(logits).sum(dim=1), torch.tensor([len(matchers[0].allowed_token_ids())] * 2))
    untouched = torch.randn(3, info.vocab_size)
    before = untouched.clone()
    apply_token_masks(untouched, [None, None, None])
    assert torch.equal(untouched, before)


def test_draft_token_rows_follow_each_draft(info, tokenizer):
    """Speculative rows: request 0 has 4 drafts (the third disallowed), request 1 is unguided with 2,
    request 2 is guided without drafts. Row j of a request is masked as after its first j drafts."""
    constraint = compile_constraint("regex", "[a-c]{1,6}", info)
    drafts = [[tokenizer.token_to_id(c) for c in "abzc"], [11, 12], []]
    matchers = [constraint.matcher(), None, constraint.matcher()]
    matchers[2].advance(tokenizer.token_to_id("c"))
    before = [m.allowed_token_ids() for m in (matchers[0], matchers[2])]
    logits = torch.randn(5 + 3 + 1, info.vocab_size)
    original = logits.clone()
    apply_token_masks(logits, matchers, drafts)

    def allowed(row):
        return torch.isfinite(logits[row]).nonzero().flatten().tolist()

    stepped = constraint.matcher()
    for j in range(3):  # up to and including the row that judges the disallowed "z"
        assert allowed(j) == stepped.allowed_token_ids()
        if j < 2:
            stepped.advance(drafts[0][j])
    assert torch.equal(logits[3:8], original[3:8])  # past the rejected draft, and the unguided request
    assert allowed(8) == before[1]
    assert [m.allowed_token_ids() for m in (matchers[0], matchers[2])] == before  # matchers did not move


def test_compiled_constraints_and_tokenizer_info_are_cached(info, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = compile_constraint("json", schema, info)
    assert compile_constraint("json", json.loads(json.dumps(schema)), info) is first
    assert tokenizer_info(tokenizer, info.vocab_size, info.stop_token_ids) is info
    one, two = first.matcher(), first.matcher()
    one.advance_many(tokenizer.encode('{"a": 1', add_special_tokens=False))
    assert two.allowed_token_ids() == first.matcher().allowed_token_ids() != one.allowed_token_ids()


def test_guided_spec_from_request_fields():
    assert guided_spec() is None
    assert guided_spec(guided_json=None, guided_regex="a+") == ("regex", "a+")
    assert guided_spec(guided_choice=["x", "y"]) == ("choice", ["x", "y"])
    assert guided_spec(response_format={"type": "text"}) is None
    assert guided_spec(response_format={"type": "json_object"}) == ("json", {"type": "object"})
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert guided_spec(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}) \
        == ("json", schema)
    with pytest.raises(ValueError, match="at most one guided decoding field"):
        guided_spec(guided_json=schema, guided_regex="a")
    with pytest.raises(ValueError, match="at most one"):
        guided_spec(response_format={"type": "json_object"}, guided_grammar='start: "a"')
    with pytest.raises(ValueError, match="json_schema.schema"):
        guided_spec(response_format={"type": "json_schema", "json_schema": {"name": "n"}})
    with pytest.raises(ValueError, match="not supported"):
        guided_spec(response_format={"type": "structural_tag"})
    with pytest.raises(ValueError, match="unknown guided decoding field"):
        guided_spec(guided_xml="<a/>")


def test_sentencepiece_tokenizer(tmp_path):
    """A byte-fallback sentencepiece model trained here: masks follow its pieces (with "▁" as a space)."""
    import sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog café hello world 12 34".split()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]),
        model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = Tokenizer.from_folder(tmp_path)
    sp_info = tokenizer_info(tokenizer, tokenizer.vocab_size + 8, [tokenizer.eos_token_id])
    pattern = r"(hello|world|café) [0-9]{2}\n"
    constraint = compile_constraint("regex", pattern, sp_info)
    texts = {generate(constraint, tokenizer, torch.zeros(sp_info.vocab_size), seed) for seed in range(4)}
    for text in texts:
        assert re.fullmatch(pattern, text), text
    assert max(constraint.matcher().allowed_token_ids()) < tokenizer.vocab_size
