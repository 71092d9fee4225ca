"""The body of `POST /v1/completions` (and LLM Engine's `/v2/completions`): its schema, its prompts (one, or a
batch), `n` and `best_of`, and the runtime's SamplingParams. The fields it shares with chat and the rule every
field follows (honoured or refused, never dropped) are in sampling_fields.py and field_policy.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.params import MAX_TOP_LOG_PROBS
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.field_policy import REFUSED_COMMON
from llmengine_runtime.server.sampling_fields import SamplingFields, check_range, sampling_params

MAX_PROMPTS = 256  # prompts in one request (each is n engine requests)

Prompt = str | list[int]


class OpenAICompletionRequest(SamplingFields):
    """`POST /v1/completions` (OpenAI's legacy completions, with vLLM's extra fields)."""

    REFUSED: ClassVar[dict[str, tuple[list[Any], str]]] = {
        **REFUSED_COMMON,
        "suffix": ([""], "the models served here do not fill in the middle"),
        "prompt_embeds": ([], "prompt embeddings are not accepted: send text or token ids"),
    }

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    add_special_tokens: bool | None = None  # vLLM's: add the tokenizer's BOS (default true)
    suffix: Any = None
    prompt_embeds: Any = None


def completion_prompts(req: OpenAICompletionRequest) -> list[Prompt]:
    """The request's prompts: a string or token ids (one prompt), or a list of strings or of token-id lists (a
    batch, answered in order); 400 naming the first empty one."""
    prompt = req.prompt
    batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts: list[Prompt] = list(prompt) if batch else [prompt]
    if not prompts or prompt == []:
        raise bad_request("prompt is empty")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt has {len(prompts)} prompts: accepted at most {MAX_PROMPTS} per request")
    for i, p in enumerate(prompts):
        if isinstance(p, list) and not p:
            raise bad_request(f"prompt[{i}] is empty" if batch else "prompt is empty")
    return prompts


def sampling_params_openai(req: OpenAICompletionRequest, max_model_len: int | None = None) -> SamplingParams:
    lp = req.logprobs
    check_range("logprobs", lp, lp is not None and 0 <= lp <= MAX_TOP_LOG_PROBS, f"0 to {MAX_TOP_LOG_PROBS}")
    return sampling_params(req, max_tokens=16 if req.max_tokens is None else req.max_tokens,
                           log_probs=lp is not None, top_log_probs=lp or 0,
                           prompt_log_probs=bool(req.echo) and (lp is not None or req.max_tokens == 0),
                           max_model_len=max_model_len)
