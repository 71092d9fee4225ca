"""Request bodies of the two APIs, their parsing, and their translation into the runtime's SamplingParams.

Policy for bad bodies (docs/architecture.md, "Wire protocol"): malformed JSON, a body that is not an
object, a missing field or a field of the wrong type are all 400 with a one-line `detail` naming the field
(never FastAPI's 422: the official client maps 400 to BadRequestError, but 422 only to UnknownError). Unknown
fields are ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.guided import guided_spec
from llmengine_runtime.runtime.params import MAX_TOP_LOG_PROBS
from llmengine_runtime.server.errors import bad_request


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


class StreamOptions(_Body):
    include_usage: bool | None = False


class OpenAICompletionRequest(_Body):
    """`POST /v1/completions` (OpenAI legacy completions), the subset one engine request can serve."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extension, as on the LLM Engine route
    speculative: bool | None = None  # our extension, as on the LLM Engine route
    # guided decoding: vLLM's extra fields and OpenAI's response_format (as vLLM accepts it here too)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    response_format: Any = None


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
            field = str(err["loc"][0]) if err["loc"] else "body"
            problems.setdefault(field, f"{field}: {err['msg'].lower()}")
        raise bad_request("invalid request body: " + "; ".join(problems.values())) from None


def _check_range(name: str, value: float | None, ok: bool, accepted: str) -> None:
    if value is not None and not ok:
        raise bad_request(f"{name}={value!r} is out of range: accepted {accepted}")


def _runtime_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs).validate()
    except ValueError as e:
        raise bad_request(str(e)) from None


def guided(req: Any, response_format: Any = None) -> tuple[str, Any] | None:
    """The request's guided-decoding constraint (kind, spec) from its guided_* fields and response_format, or
    None; 400 for more than one or a response_format we do not serve. The engine compiles it when the request
    is added: an invalid schema, regex or grammar is a 400 from there, before anything is queued."""
    try:
        return guided_spec(response_format, guided_json=req.guided_json, guided_regex=req.guided_regex,
                           guided_choice=req.guided_choice, guided_grammar=req.guided_grammar)
    except ValueError as e:
        raise bad_request(str(e)) from None


def sampling_params_v1(req: CompletionV1Request) -> SamplingParams:
    """The LLM Engine rules (docs/architecture.md, "Wire protocol"), stricter than the runtime's: temperature
    and penalties as the official client bounds them, at most one guided_* field, and no top_k/top_p alongside
    greedy decoding."""
    constraint = guided(req)
    t = req.temperature
    _check_range("temperature", t, 0 <= t <= 1, "[0, 1] (0 = greedy)")
    _check_range("max_new_tokens", req.max_new_tokens, req.max_new_tokens >= 1, "an integer >= 1")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        _check_range(name, value, value is not None and 0 <= value <= 2, "[0, 2]")
    k, p = req.top_k, req.top_p
    _check_range("top_k", k, k is not None and (k == -1 or k >= 1), "-1 (off) or an integer >= 1")
    _check_range("top_p", p, p is not None and 0 < p <= 1, "0 < top_p <= 1")
    if t == 0 and (k not in (None, -1) or p not in (None, 1.0)):
        raise bad_request("top_k and top_p must be unset (or -1 and 1.0) when temperature is 0 (greedy)")
    return _runtime_params(
        max_new_tokens=req.max_new_tokens, temperature=t, top_k=-1 if k is None else k,
        top_p=1.0 if p is None else p, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, stop_sequences=list(req.stop_sequences or []),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        return_token_log_probs=bool(req.return_token_log_probs), ignore_eos=bool(req.ignore_eos),
        speculate=req.speculative is not False, guided=constraint)


def openai_prompt(req: OpenAICompletionRequest) -> str | list[int]:
    """One prompt: a string, a list of one string, token ids, or a list of one list of token ids."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("only one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise bad_request("prompt is empty")
    return prompt


def check_seed(seed: int | None) -> None:
    _check_range("seed", seed, seed is None or -2 ** 63 <= seed < 2 ** 64, "a 64-bit integer")


def openai_sampling(*, max_tokens: int, max_tokens_name: str = "max_tokens", temperature: float | None,
                    top_p: float | None, stop: str | list[str] | None, presence_penalty: float | None,
                    frequency_penalty: float | None, seed: int | None, log_probs: bool,
                    ignore_eos: bool, guided: tuple[str, Any] | None = None, top_log_probs: int = 0,
                    prompt_log_probs: bool = False) -> SamplingParams:
    """The sampling fields completions and chat completions share, with OpenAI's ranges and defaults. max_tokens
    0 only with prompt_log_probs (echo: score the prompt without generating)."""
    t = 1.0 if temperature is None else temperature
    _check_range("temperature", t, 0 <= t <= 2, "[0, 2]")
    if prompt_log_probs:
        _check_range(max_tokens_name, max_tokens, max_tokens >= 0, "an integer >= 0")
    else:
        _check_range(max_tokens_name, max_tokens, max_tokens >= 1,
                     "an integer >= 1 (0 only with echo: true, which scores the prompt)")
    check_seed(seed)
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    return _runtime_params(
        max_new_tokens=max_tokens, temperature=t,
        top_p=1.0 if top_p is None or t == 0 else top_p,  # greedy ignores top_p, as OpenAI does
        presence_penalty=presence_penalty or 0.0, frequency_penalty=frequency_penalty or 0.0,
        seed=seed, stop_sequences=stop_list, return_token_log_probs=log_probs, ignore_eos=ignore_eos, guided=guided,
        top_log_probs=top_log_probs, prompt_log_probs=prompt_log_probs)


def completion_choices(req: OpenAICompletionRequest) -> int:
    """`n` of a completions request; `best_of` may only repeat it (we do not rank candidates)."""
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise bad_request(f"best_of={req.best_of} is not supported: only best_of equal to n ({n}), since "
                          "candidates are not ranked")
    return n


def sampling_params_openai(req: OpenAICompletionRequest) -> SamplingParams:
    if req.suffix is not None:
        raise bad_request("suffix is not supported: the models served here do not fill in the middle")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported")
    lp = req.logprobs
    _check_range("logprobs", lp, lp is not None and 0 <= lp <= MAX_TOP_LOG_PROBS, f"0 to {MAX_TOP_LOG_PROBS}")
    params = openai_sampling(max_tokens=16 if req.max_tokens is None else req.max_tokens, temperature=req.temperature,
                             top_p=req.top_p, stop=req.stop, presence_penalty=req.presence_penalty,
                             frequency_penalty=req.frequency_penalty, seed=req.seed, log_probs=lp is not None,
                             ignore_eos=bool(req.ignore_eos), guided=guided(req, req.response_format),
                             top_log_probs=lp or 0,
                             prompt_log_probs=bool(req.echo) and (lp is not None or req.max_tokens == 0))
    params.speculate = req.speculative is not False
    return params
