"""OpenAI-compatible `POST /v1/completions` (and LLM Engine's `POST /v2/completions`), plain and streamed: one
prompt or a batch of them, `n` choices each, enough for the `openai` client's `completions.create(...)`, vLLM's
benchmark clients and lm-evaluation-harness.

Choices come in vLLM's order: choice `i * n + j` is sample j of prompt i, in a stream as in a whole answer. All
the engine requests are admitted together (choices.py), so a batch is computed as a batch; a prompt that cannot be
served fails the whole request with a 400 naming its index, before anything is generated.

`logprobs` N (0..20) gives each token's log-prob and its N most likely alternatives; `echo` returns the prompt
before the completion, with its tokens' log-probs (the first null) when `logprobs` is set, and with `max_tokens` 0
scores a text without generating (log_probs_format.py). vLLM's `prompt_logprobs` N (0..20) gives each choice its
prompt's tokens' log-probs, ranks and top-N (log_probs_format.prompt_logprobs); streamed, in the choice's first
chunk (where vLLM refuses N > 0 with stream and drops N = 0). vLLM's outputs:
`stop_reason` (the stop string or `stop_token_ids` token that ended a choice), `token_ids` and `prompt_token_ids`
with `return_token_ids`, usage in every chunk with `stream_options.continuous_usage_stats`, and
`usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server.choices import ChoiceGroup, start_choices
from llmengine_runtime.server.completion_schemas import (
    OpenAICompletionRequest,
    Prompt,
    completion_prompts,
    sampling_params_openai,
)
from llmengine_runtime.server.errors import ApiError, ClientGone, GenerationError
from llmengine_runtime.server.log_probs_format import LegacyLogProbs, prompt_logprobs
from llmengine_runtime.server.middleware import use_request_id
from llmengine_runtime.server.openai_api import openai_frames
from llmengine_runtime.server.sampling_fields import num_choices
from llmengine_runtime.server.schemas import parse_body
from llmengine_runtime.server.sse import CLIENT_CLOSED, open_stream
from llmengine_runtime.server.state import ServedEngine, ServerState


class _Echo:
    """One prompt's echo: its text (and, with logprobs, its tokens' log-probs) before each of its choices' first
    output."""

    def __init__(self, req: OpenAICompletionRequest, prompt: Prompt, engine: ServedEngine) -> None:
        self.on = bool(req.echo)
        tokenizer = engine.tokenizer
        self.text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt) if tokenizer else ""
        self.top = req.logprobs
        self.tokenizer = tokenizer
        self.by_id = bool(req.return_tokens_as_token_ids)  # vLLM's: tokens named token_id:N
        self.started: set[int] = set()

    def log_probs(self) -> LegacyLogProbs:
        return LegacyLogProbs(None if self.by_id else self.tokenizer, self.top,
                              per_token_text=bool(self.top) or self.on or self.by_id)

    def first(self, i: int, out: Any, log_probs: LegacyLogProbs) -> str:
        """The text to put before choice i's output `out`: the prompt on its first output, else ""."""
        if not self.on or i in self.started:
            return ""
        self.started.add(i)
        if self.top is not None and out.prompt_log_probs is not None:
            log_probs.add_prompt(out)
        return self.text


class _Choices:
    """What the answer says about each choice beside its text: echo, log-probs and token ids."""

    def __init__(self, req: OpenAICompletionRequest, prompts: list[Prompt], engine_prompts: list[Prompt],
                 params: SamplingParams, engine: ServedEngine, n: int) -> None:
        self.n = n
        self.echoes = [_Echo(req, prompt, engine) for prompt in prompts]
        self.log_probs = [self.echoes[i // n].log_probs() for i in range(len(prompts) * n)]
        self.want_log_probs = params.return_token_log_probs
        self.token_ids = bool(req.return_token_ids)
        keep = params.truncate_prompt_tokens  # the engine keeps only these last prompt tokens
        self.prompt_ids = [(p[-keep:] if keep else p) if isinstance(p, list) else None for p in engine_prompts]
        self.prompt_top = req.prompt_logprobs  # vLLM's prompt_logprobs N (None: not asked)
        self.tokenizer = engine.tokenizer
        self.prompt_logprobs: list[list | None] = [None] * (len(prompts) * n)

    def add_prompt_logprobs(self, i: int, out: Any) -> None:
        """Choice i's prompt_logprobs, from the output that carries its prompt's scores."""
        if self.prompt_top is not None and out.prompt_log_probs is not None:
            self.prompt_logprobs[i] = prompt_logprobs(out, self.tokenizer, self.prompt_top)

    def text(self, i: int, out: Any) -> str:
        return self.echoes[i // self.n].first(i, out, self.log_probs[i]) + out.text

    def extra(self, i: int, token_ids: list[int], first: bool) -> dict:
        """vLLM's return_token_ids fields: the choice's (new) token ids, and its prompt's ids (streamed: first);
        prompt_logprobs when asked (streamed: first)."""
        scores = {"prompt_logprobs": self.prompt_logprobs[i]} if first and self.prompt_top is not None else {}
        if not self.token_ids:
            return scores
        return {"token_ids": token_ids, **({"prompt_token_ids": self.prompt_ids[i // self.n]} if first else {}),
                **scores}


def engine_prompts(req: OpenAICompletionRequest, prompts: list[Prompt], engine: ServedEngine) -> list[Prompt]:
    """The prompts as the engine gets them: text is tokenized here when the answer needs its ids (return_token_ids)
    or when add_special_tokens is false (the engine's own encoding adds them)."""
    plain = req.add_special_tokens is not False
    if engine.tokenizer is None or (plain and not req.return_token_ids):
        return prompts
    return [engine.tokenizer.encode(p, add_special_tokens=plain) if isinstance(p, str) else p for p in prompts]


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    @app.post("/v2/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(await request.body(), OpenAICompletionRequest)
        use_request_id(request, req.request_id)
        model = state.model_name(req.model)
        engine = state.engine(model)
        prompts, n = completion_prompts(req), num_choices(req)
        params = sampling_params_openai(req, engine.max_model_len)
        for_engine = engine_prompts(req, prompts, engine)
        choices = _Choices(req, prompts, for_engine, params, engine, n)
        group = start_choices(state, request, model, for_engine, params, n, stream=bool(req.stream))
        head = {"id": f"cmpl-{request.state.request_id}", "object": "text_completion",
                "created": int(time.time()), "model": model}
        if req.stream:
            options = req.stream_options
            frames = openai_frames(_stream(group, head, choices, bool(options and options.include_usage),
                                           bool(options and options.continuous_usage_stats)))
            return await open_stream(group, state, frames) or Response(status_code=CLIENT_CLOSED)
        return await _answer(group, head, choices)


async def _answer(group: ChoiceGroup, head: dict, choices: _Choices) -> Response:
    count = len(group.jobs)
    text: list[list[str]] = [[] for _ in range(count)]
    token_ids: list[list[int]] = [[] for _ in range(count)]
    last: list[Any] = [None] * count
    try:
        async for i, out in group.outputs():
            text[i].append(choices.text(i, out))
            choices.log_probs[i].add(out)
            token_ids[i] += out.token_ids
            choices.add_prompt_logprobs(i, out)
            last[i] = out
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except GenerationError as e:
        raise ApiError(e.status, e.message) from None
    finally:
        group.close()
    answer = [{"index": i, "text": "".join(text[i]), "finish_reason": last[i].finish_reason,
               "stop_reason": last[i].stop_reason,
               "logprobs": choices.log_probs[i].since(0) if choices.want_log_probs else None,
               **choices.extra(i, token_ids[i], first=True)} for i in range(count)]
    return JSONResponse({**head, "choices": answer, "usage": group.usage(), "system_fingerprint": None})


async def _stream(group: ChoiceGroup, head: dict, choices: _Choices, include_usage: bool,
                  continuous_usage: bool) -> AsyncIterator[dict]:
    sent: set[int] = set()
    async for i, out in group.outputs():
        log_probs = choices.log_probs[i]
        start = len(log_probs.tokens)
        text = choices.text(i, out)
        log_probs.add(out)
        choices.add_prompt_logprobs(i, out)  # (sent with the choice's first chunk)
        if not text and not out.finished and not ((choices.want_log_probs or choices.token_ids) and out.token_ids):
            continue
        choice = {"index": i, "text": text, "finish_reason": out.finish_reason if out.finished else None,
                  "stop_reason": out.stop_reason if out.finished else None,
                  "logprobs": log_probs.since(start) if choices.want_log_probs else None,
                  **choices.extra(i, out.token_ids, first=i not in sent)}
        sent.add(i)
        usage = {"usage": group.choice_usage(i)} if include_usage and continuous_usage else {}
        yield {**head, "choices": [choice], **usage}
    if include_usage:
        yield {**head, "choices": [], "usage": group.usage()}
