"""Request bodies: their parsing, and the LLM Engine body with its translation into the runtime's SamplingParams
(the OpenAI-style bodies: completion_schemas.py, chat_schemas.py, over sampling_fields.py).

Policy for bad bodies (docs/architecture.md, "Wire protocol"): malformed JSON, a body that is not an
object, a missing field or a field of the wrong type are all 400 with a one-line `detail` naming the field
(never FastAPI's 422: the official client maps 400 to BadRequestError, but 422 only to UnknownError). Unknown
fields are ignored by the LLM Engine body (its official client sends fields of its own) and refused by the OpenAI
ones (field_policy.py).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.field_policy import unknown_field
from llmengine_runtime.server.sampling_fields import check_range, guided, runtime_params


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: "5" is not an int, 1.5 is not an int


class CompletionV1Request(_Body):
    """`POST /v1/llm/completions-{sync,stream}`: exactly what scale-llm-engine sends (nulls included)."""

    prompt: str
    max_new_tokens: int
    temperature: float
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    include_stop_str_in_output: bool | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    skip_special_tokens: bool | None = True
    ignore_eos: bool | None = False  # our extension (as vLLM's): benchmarks generate exactly max_new_tokens
    speculative: bool | None = None  # our extension: false opts out of speculative decoding where it is on


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> `model`, or ApiError(400) saying what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems: dict[str, str] = {}  # the first complaint per field (a union field gets one per member)
        for err in e.errors(include_url=False):
            field = ".".join(map(str, err["loc"][:2] if err["type"] == "extra_forbidden" else err["loc"][:1])) \
                if err["loc"] else "body"
            problems.setdefault(field, unknown_field(field) if err["type"] == "extra_forbidden"
                                else f"{field}: {err['msg'].lower()}")
        raise bad_request("invalid request body: " + "; ".join(problems.values())) from None


def sampling_params_v1(req: CompletionV1Request) -> SamplingParams:
    """The LLM Engine rules (docs/architecture.md, "Wire protocol"), stricter than the runtime's: temperature
    and penalties as the official client bounds them, at most one guided_* field, and no top_k/top_p alongside
    greedy decoding."""
    constraint = guided(req)
    t = req.temperature
    check_range("temperature", t, 0 <= t <= 1, "[0, 1] (0 = greedy)")
    check_range("max_new_tokens", req.max_new_tokens, req.max_new_tokens >= 1, "an integer >= 1")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        check_range(name, value, value is not None and 0 <= value <= 2, "[0, 2]")
    k, p = req.top_k, req.top_p
    check_range("top_k", k, k is not None and (k == -1 or k >= 1), "-1 (off) or an integer >= 1")
    check_range("top_p", p, p is not None and 0 < p <= 1, "0 < top_p <= 1")
    if t == 0 and (k not in (None, -1) or p not in (None, 1.0)):
        raise bad_request("top_k and top_p must be unset (or -1 and 1.0) when temperature is 0 (greedy)")
    return runtime_params(
        max_new_tokens=req.max_new_tokens, temperature=t, top_k=-1 if k is None else k,
        top_p=1.0 if p is None else p, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, stop_sequences=list(req.stop_sequences or []),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        return_token_log_probs=bool(req.return_token_log_probs), ignore_eos=bool(req.ignore_eos),
        speculate=req.speculative is not False, guided=constraint)
