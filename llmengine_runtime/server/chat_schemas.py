"""The body of `POST /v1/chat/completions` (and LLM Engine's `/v2/chat/completions`): its schema, the fields
we refuse, the messages as the chat template wants them, and the runtime's SamplingParams.

Unknown fields are ignored, as elsewhere; but a known OpenAI field that would change the answer and that we
cannot honour (tools, images, audio, logit_bias, ...) is a 400 naming it, never silently dropped. Nulls count as
absent. `response_format` text, json_object and json_schema, and vLLM's guided_* extra fields, constrain the
answer (guided decoding; server/schemas.py `guided`).
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.schemas import StreamOptions, _Body, check_seed, guided, openai_sampling

ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer name for system
MAX_TOP_LOGPROBS = 20

# field -> why it is refused; a field is refused when present and not null (or not its harmless value below)
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "logit_bias": "logit_bias is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
HARMLESS = {"modalities": [["text"]], "logit_bias": [{}]}


class ChatCompletionRequest(_Body):
    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logprobs: bool | None = False
    top_logprobs: int | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extension, as on the other routes
    response_format: Any = None  # text, json_object or json_schema (guided decoding)
    guided_json: Any = None  # vLLM's guided decoding extra fields
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # refused unless null (see UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    logit_bias: Any = None
    prediction: Any = None
    web_search_options: Any = None


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 naming the first OpenAI field of the request that we would otherwise have to ignore."""
    for field, why in UNSUPPORTED.items():
        value = getattr(req, field)
        if value is not None and value not in HARMLESS.get(field, []):
            raise bad_request(f"{field} is not supported: {why}")


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"type {kind!r}" if kind else "a part without a type"
            raise bad_request(f"{where}.content[{j}] is {shown}: only text parts "
                              '({"type": "text", "text": ...}) are supported (no images, audio or files)')
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The request's messages as chat templates read them: [{"role", "content": str}], or 400 naming the
    message that is wrong."""
    if not messages:
        raise bad_request("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported: accepted system, user, assistant"
                              + (" (tool calling is not supported)" if role in ("tool", "function") else ""))
        for field in ("tool_calls", "function_call", "audio"):
            if message.get(field) is not None:
                raise bad_request(f"{where}.{field} is not supported")
        if message.get("content") is None:
            raise bad_request(f"{where}.content is required")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text(message["content"], where)})
    return out


def chat_sampling_params(req: ChatCompletionRequest, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """SamplingParams for one choice (seed as given). Without max_tokens, the answer may fill the context."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true")
    top = req.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs={top} is out of range: accepted 0 to {MAX_TOP_LOGPROBS}")
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true")
    check_seed(req.seed)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens
        if max_tokens < 1:
            raise bad_request(f"the prompt is {prompt_tokens} tokens after the chat template, but the model's "
                              f"context is {max_model_len} tokens: no room for an answer")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return openai_sampling(max_tokens=max_tokens, max_tokens_name=name, temperature=req.temperature,
                           top_p=req.top_p, stop=req.stop, presence_penalty=req.presence_penalty,
                           frequency_penalty=req.frequency_penalty, seed=req.seed,
                           log_probs=bool(req.logprobs), ignore_eos=bool(req.ignore_eos),
                           guided=guided(req, req.response_format), top_log_probs=top or 0)
