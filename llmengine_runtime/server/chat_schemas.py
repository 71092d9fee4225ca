"""The body of `POST /v1/chat/completions` (and LLM Engine's `/v2/chat/completions`): its schema, the fields
we refuse, the messages as the chat template wants them, and the runtime's SamplingParams.

The fields it shares with completions, and the rule every field follows (honoured or refused with a 400 naming
it, never dropped; unknown fields refused too), are in sampling_fields.py and field_policy.py. Nulls count as
absent. Chat's own honoured fields: messages, max_tokens / max_completion_tokens, logprobs, top_logprobs, and
vLLM's echo, add_generation_prompt, continue_final_message, add_special_tokens, documents, chat_template_kwargs
and reasoning_effort (the last three reach the chat template, as vLLM passes them); tools, tool_choice and
parallel_tool_calls (tools.py, tool_calls.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.field_policy import NO_EFFECT_COMMON, REFUSED_COMMON, OpenAIBody
from llmengine_runtime.server.sampling_fields import SamplingFields, sampling_params
from llmengine_runtime.server.tools import history_tool_calls

ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer name for system
MAX_TOP_LOGPROBS = 20

# field -> (accepted values, why); refused when present, not null and not accepted (field_policy.py)
REFUSED_CHAT: dict[str, tuple[list[Any], str]] = {
    **REFUSED_COMMON,
    "functions": ([[]], "function calling is not supported"),
    "function_call": (["none"], "function calling is not supported"),
    "audio": ([], "audio output is not supported"),
    "modalities": ([["text"]], "only text output is supported"),
    "prediction": ([], "predicted outputs are not supported"),
    "web_search_options": ([], "web search is not supported"),
    "chat_template": ([], "per-request chat templates are not accepted: the model's own template is used"),
    "verbosity": ([], "the models served here have no verbosity setting"),
}
NO_EFFECT_CHAT = {
    **NO_EFFECT_COMMON,
    "include_reasoning": "the models served here have no reasoning parser: their whole answer is the content",
    "mm_processor_kwargs": "only text is accepted: there is no media to process",
    "media_io_kwargs": "only text is accepted: there is no media to read",
}
TEMPLATE_OWN = {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "documents"}


class ChatTemplateFields(OpenAIBody):
    """The fields that say how the messages become a prompt: chat completions' and /tokenize's."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    tools: list[Any] | None = None  # function tools (tools.py)
    chat_template: Any = None  # refused
    mm_processor_kwargs: Any = None  # no effect


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    REFUSED: ClassVar[dict[str, tuple[list[Any], str]]] = REFUSED_CHAT
    NO_EFFECT: ClassVar[dict[str, str]] = NO_EFFECT_CHAT

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    echo: bool | None = False  # vLLM's: the last message's content first, when it is the assistant's
    tool_choice: str | dict[str, Any] | None = None  # tools.py
    parallel_tool_calls: bool | None = None
    # refused unless null or accepted (REFUSED_CHAT), or of no effect (NO_EFFECT_CHAT)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    include_reasoning: Any = None
    media_io_kwargs: Any = None


def template_kwargs(req: ChatTemplateFields) -> dict[str, Any]:
    """The extra variables the chat template sees: chat_template_kwargs, documents and reasoning_effort."""
    kwargs = dict(req.chat_template_kwargs or {})
    clash = sorted(TEMPLATE_OWN & set(kwargs))
    if clash:
        raise bad_request(f"chat_template_kwargs.{clash[0]} is not accepted: the server sets it "
                          f"(accepted: any other name, e.g. enable_thinking)")
    if req.documents is not None:
        kwargs["documents"] = req.documents
    if req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
    return kwargs


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


MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages as chat templates read them: {"role", "content": str} plus `name`, an assistant's
    `tool_calls` (arguments parsed) and a tool result's `tool_call_id`; or 400 naming the message that is wrong."""
    if not messages:
        raise bad_request("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ROLES and role != "tool":
            raise bad_request(f"{where}.role {role!r} is not supported: accepted system, developer, user, assistant, "
                              "tool")
        unknown = sorted(k for k, v in message.items() if k not in MESSAGE_KEYS and v is not None)
        if unknown:
            raise bad_request(f"{where}.{unknown[0]} is not supported")
        calls = message.get("tool_calls")
        if message.get("content") is None and not (role == "assistant" and calls):
            raise bad_request(f"{where}.content is required")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": _text(message.get("content") or "", where)}
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        if calls:
            if role != "assistant":
                raise bad_request(f"{where}.tool_calls: only assistant messages make tool calls")
            item["tool_calls"] = history_tool_calls(calls, where)
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise bad_request(f"{where}.tool_call_id is required (the id of the call it answers)")
            item["tool_call_id"] = message["tool_call_id"]
        out.append(item)
    return out


def chat_sampling_params(req: ChatCompletionRequest, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """SamplingParams for one choice (seed as given). Without max_tokens, the answer may fill the context."""
    top = req.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs={top} is out of range: accepted 0 to {MAX_TOP_LOGPROBS}")
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens
        if max_tokens < 1:
            raise bad_request(f"the prompt is {prompt_tokens} tokens after the chat template, but the model's "
                              f"context is {max_model_len} tokens: no room for an answer")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return sampling_params(req, max_tokens=max_tokens, max_tokens_name=name, log_probs=bool(req.logprobs),
                           top_log_probs=top or 0, max_model_len=max_model_len)
