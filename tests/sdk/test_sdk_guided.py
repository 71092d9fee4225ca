"""Completion.create / acreate send the guided decoding fields as the official client names them."""

import asyncio
import inspect

import pytest
from llmengine import Completion
from llmengine.errors import ValidationError

GUIDED = ["guided_json", "guided_regex", "guided_choice", "guided_grammar"]


def test_guided_parameters_follow_the_official_order():
    for method in (Completion.create, Completion.acreate):
        names = list(inspect.signature(method).parameters)
        start = names.index("include_stop_str_in_output") + 1
        assert names[start:start + 4] == GUIDED


@pytest.mark.parametrize("field, value", [("guided_json", {"type": "object", "properties": {"a": {"type": "integer"}}}),
                                          ("guided_regex", "[a-z]+"), ("guided_choice", ["x", "y"]),
                                          ("guided_grammar", '?start: "a"')])
def test_each_guided_field_is_sent(fake, field, value):
    Completion.create(model="echo", prompt="p", **{field: value})
    asyncio.run(Completion.acreate(model="echo", prompt="p", **{field: value}))
    for body in fake.bodies:
        assert body[field] == value
        assert all(body[other] is None for other in GUIDED if other != field)


@pytest.mark.parametrize("fields, named", [({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                                           ({"guided_json": "{}"}, "guided_json"),
                                           ({"guided_regex": 5}, "guided_regex"),
                                           ({"guided_choice": "ab"}, "guided_choice"),
                                           ({"guided_grammar": ["x"]}, "guided_grammar")])
def test_bad_guided_fields_fail_before_sending(fake, fields, named):
    with pytest.raises(ValidationError) as e:
        Completion.create(model="echo", prompt="p", **fields)
    assert named in str(e.value)
    assert fake.bodies == []
