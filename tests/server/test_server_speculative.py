"""Speculative decoding on the server: the `speculative` opt-out field of both completion bodies, and /metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmengine_runtime.server.completion_schemas import OpenAICompletionRequest, sampling_params_openai
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.metrics import Metrics
from llmengine_runtime.server.schemas import CompletionV1Request, parse_body, sampling_params_v1

V1 = {"prompt": "hi", "max_new_tokens": 4, "temperature": 0}
OPENAI = {"model": "m", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("field, want", [({}, True), ({"speculative": None}, True), ({"speculative": True}, True),
                                         ({"speculative": False}, False)])
def test_the_speculative_field_maps_to_speculate(field, want):
    v1 = sampling_params_v1(parse_body(json.dumps({**V1, **field}).encode(), CompletionV1Request))
    openai = sampling_params_openai(parse_body(json.dumps({**OPENAI, **field}).encode(), OpenAICompletionRequest))
    assert v1.speculate is want and openai.speculate is want


def test_a_non_bool_speculative_field_is_a_400():
    with pytest.raises(ApiError) as e:
        parse_body(json.dumps({**V1, "speculative": "no"}).encode(), CompletionV1Request)
    assert e.value.status == 400 and "speculative" in e.value.detail


def scrape(stats: dict) -> str:
    return Metrics(lambda: {"m": SimpleNamespace(stats=lambda: stats)}).render().decode()


def test_metrics_export_proposed_accepted_acceptance_and_mean_accepted_length():
    text = scrape({"spec_proposed_tokens": 400, "spec_accepted_tokens": 300, "spec_steps": 120})
    assert 'llmengine_spec_proposed_tokens_total{model="m"} 400.0' in text
    assert 'llmengine_spec_accepted_tokens_total{model="m"} 300.0' in text
    assert 'llmengine_spec_acceptance_rate{model="m"} 0.75' in text
    assert 'llmengine_spec_mean_accepted_length{model="m"} 2.5' in text


def test_no_rates_before_any_proposal():
    text = scrape({"spec_proposed_tokens": 0, "spec_accepted_tokens": 0, "spec_steps": 0})
    assert 'llmengine_spec_acceptance_rate{model="m"}' not in text
    assert 'llmengine_spec_mean_accepted_length{model="m"}' not in text
    assert 'llmengine_spec_proposed_tokens_total{model="m"} 0.0' in text
