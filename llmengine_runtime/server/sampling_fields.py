"""The fields `/v1/completions` and `/v1/chat/completions` share, OpenAI's and vLLM's, and their translation into
the runtime's SamplingParams with OpenAI's and vLLM's ranges and defaults.

Honoured here: temperature (any value >= 0; 0 = greedy), top_p, top_k (-1 or 0 = off), min_p, presence, frequency
and repetition penalties, seed, stop, stop_token_ids, min_tokens, ignore_eos, logit_bias, allowed_token_ids,
bad_words, include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens, prompt_logprobs (0..20, streamed or
not; log_probs_format.prompt_logprobs formats them) and the guided-decoding fields
(guided_*, response_format, structured_outputs). The routes honour the rest (n, stream, stream_options,
return_token_ids, request_id, model, ...). Refused and no-effect fields: field_policy.py.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.guided import guided_spec
from llmengine_runtime.runtime.params import MAX_TOP_LOG_PROBS
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.field_policy import OpenAIBody

# structured_outputs' keys -> the guided-decoding kind they give (json_object: any JSON object)
STRUCTURED_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json"}
STRUCTURED_NO_EFFECT = {"backend", "disable_fallback", "disable_additional_properties", "_backend"}


class StreamOptions(OpenAIBody):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: usage in every chunk


class SamplingFields(OpenAIBody):
    """Fields both OpenAI routes declare (see field_policy.py for the refused and no-effect ones)."""

    model: str | None = None  # optional when one model is served
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    best_of: int | None = None
    temperature: float | None = None  # 1.0 when null, as vLLM
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_token_ids: bool | None = None
    request_id: str | None = None  # vLLM's: the request's id (as the X-Request-Id header)
    return_tokens_as_token_ids: bool | None = None  # vLLM's: log-probs name tokens token_id:N
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-prob, rank and top-N (0..20)
    speculative: bool | None = None  # our extension: false opts out of speculative decoding where it is on
    # guided decoding: vLLM's fields and OpenAI's response_format
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # declared to be refused or to have no effect (field_policy.py)
    use_beam_search: Any = None
    logits_processors: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    repetition_detection: Any = None
    priority: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    user: Any = None
    metadata: Any = None
    service_tier: Any = None
    store: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    length_penalty: Any = None
    guided_decoding_backend: Any = None
    spaces_between_special_tokens: Any = None


def check_range(name: str, value: float | None, ok: bool, accepted: str) -> None:
    if value is not None and not ok:
        raise bad_request(f"{name}={value!r} is out of range: accepted {accepted}")


def check_seed(seed: int | None) -> None:
    check_range("seed", seed, seed is None or -2 ** 63 <= seed < 2 ** 64, "a 64-bit integer")


def runtime_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs).validate()
    except ValueError as e:
        raise bad_request(str(e)) from None


def _structured(spec: Any) -> tuple[str, Any] | None:
    """vLLM's `structured_outputs` object -> (kind, spec), or None when it asks for nothing."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise bad_request("structured_outputs must be an object: one of json, regex, choice, grammar, json_object")
    unknown = [k for k, v in spec.items() if k not in STRUCTURED_KINDS and k not in STRUCTURED_NO_EFFECT
               and v not in (None, False, "")]
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]} is not supported: accepted json, regex, choice, grammar "
                          "or json_object")
    given = [(k, v) for k, v in spec.items() if k in STRUCTURED_KINDS and v not in (None, False)]
    if len(given) > 1:
        raise bad_request(f"structured_outputs takes one constraint, got {', '.join(k for k, _ in given)}")
    if not given:
        return None
    key, value = given[0]
    return STRUCTURED_KINDS[key], {"type": "object"} if key == "json_object" else value


def guided(req: Any, response_format: Any = None) -> tuple[str, Any] | None:
    """The request's guided-decoding constraint (kind, spec) from its guided_* fields, response_format and
    structured_outputs, or None; 400 for more than one or a response_format we do not serve. The engine compiles it
    when the request is added: an invalid schema, regex or grammar is a 400 from there, before anything is queued."""
    try:
        spec = guided_spec(response_format, guided_json=req.guided_json, guided_regex=req.guided_regex,
                           guided_choice=req.guided_choice, guided_grammar=req.guided_grammar)
    except ValueError as e:
        raise bad_request(str(e)) from None
    structured = _structured(getattr(req, "structured_outputs", None))
    if structured is not None and spec is not None:
        raise bad_request("at most one guided decoding field per request: structured_outputs and another one")
    return structured or spec


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids (integers as strings), e.g. {\"50256\": -100}") from None


def prompt_top(req: SamplingFields) -> int | None:
    """vLLM's `prompt_logprobs` N (0..20), or None when not asked; 400 naming it out of range. Streamed too (each
    choice's first chunk carries them), where vLLM refuses N > 0 and drops N = 0."""
    n = req.prompt_logprobs
    check_range("prompt_logprobs", n, n is not None and 0 <= n <= MAX_TOP_LOG_PROBS,
                f"an integer from 0 to {MAX_TOP_LOG_PROBS} (-1, the whole vocabulary, is not supported)")
    return n


def num_choices(req: SamplingFields) -> int:
    """`n`; `best_of` may only repeat it (candidates are not ranked)."""
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise bad_request(f"best_of={req.best_of} is not supported: only best_of equal to n ({n}), since "
                          "candidates are not ranked")
    return n


def sampling_params(req: SamplingFields, *, max_tokens: int, max_tokens_name: str = "max_tokens",
                    log_probs: bool = False, top_log_probs: int = 0, prompt_log_probs: bool = False,
                    max_model_len: int | None = None) -> SamplingParams:
    """SamplingParams for one choice (seed as given). max_tokens 0 only with prompt_log_probs (echo) or
    prompt_logprobs: score the prompt without generating. The prompt's top-N is the larger of echo's (top_log_probs,
    with prompt_log_probs) and prompt_logprobs' N; each answer keeps its own."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true")
    asked = prompt_top(req)
    prompt_top_log_probs = -1
    if asked is not None:
        prompt_top_log_probs = max(asked, top_log_probs) if prompt_log_probs else asked
        prompt_log_probs = True
    t = 1.0 if req.temperature is None else req.temperature
    check_range("temperature", t, t >= 0, ">= 0 (0 = greedy)")
    if prompt_log_probs:
        check_range(max_tokens_name, max_tokens, max_tokens >= 0, "an integer >= 0")
    else:
        check_range(max_tokens_name, max_tokens, max_tokens >= 1,
                    "an integer >= 1 (0 only with echo: true or prompt_logprobs, which score the prompt)")
    check_seed(req.seed)
    k = req.top_k
    check_range("top_k", k, k is None or k in (-1, 0) or k >= 1, "-1 or 0 (off) or an integer >= 1")
    truncate = req.truncate_prompt_tokens
    check_range("truncate_prompt_tokens", truncate, truncate is None or truncate == -1 or truncate >= 1,
                "an integer >= 1, or -1 (the model's context length)")
    if truncate == -1:
        truncate = max_model_len
    greedy = t == 0
    stop = req.stop
    params = runtime_params(
        max_new_tokens=max_tokens, temperature=t,
        top_p=1.0 if req.top_p is None or greedy else req.top_p,  # greedy ignores top_p and top_k, as vLLM
        top_k=-1 if k in (None, 0) or greedy else k, min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed, stop_sequences=[stop] if isinstance(stop, str) else list(stop or []),
        stop_token_ids=list(req.stop_token_ids or []), min_tokens=req.min_tokens or 0,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False, ignore_eos=bool(req.ignore_eos),
        logit_bias=_logit_bias(req.logit_bias), allowed_token_ids=req.allowed_token_ids,
        bad_words=list(req.bad_words or []), truncate_prompt_tokens=truncate,
        return_token_log_probs=log_probs, top_log_probs=top_log_probs, prompt_log_probs=prompt_log_probs,
        prompt_top_log_probs=prompt_top_log_probs,
        guided=guided(req, req.response_format))
    if req.speculative is False:
        params.speculate = False
    return params
