"""Batch completion files, shared by the server's batch jobs and `llmengine batch`: the input content
(prompts plus sampling parameters, as the official client's `CreateBatchCompletionsRequestContent`), the
output list (`{text, num_prompt_tokens, num_completion_tokens, tokens}` per prompt, in prompt order), and
writing it atomically (a temporary file in the same directory, fsync, os.replace), so a reader never sees
a half-written output.

Errors are `BatchInputError` (a ValueError) with a message naming the field and what is accepted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.detokenizer import IncrementalDetokenizer
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.schemas import CompletionV1Request, _Body, sampling_params_v1

MAX_PROMPTS = 100_000


class BatchInputError(ValueError):
    """Batch content that cannot run: says which field is wrong and what is accepted."""


class BatchContent(_Body):
    """`content` of `POST /v1/llm/batch-completions`, or the whole input file."""

    prompts: list[str]
    max_new_tokens: int
    temperature: float
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    skip_special_tokens: bool | None = True


def validation_message(e: ValidationError, prefix: str) -> str:
    """One line: the first complaint per field."""
    problems: dict[str, str] = {}
    for err in e.errors(include_url=False):
        field = ".".join(map(str, err["loc"])) or "body"
        problems.setdefault(field, f"{field}: {err['msg'].lower()}")
    return f"{prefix}: " + "; ".join(problems.values())


def parse_content(data: Any, source: str) -> BatchContent:
    """A dict (already decoded JSON) -> BatchContent; `source` names where it came from in errors."""
    if not isinstance(data, dict):
        raise BatchInputError(f"{source} must be a JSON object with prompts, max_new_tokens, temperature, ...; "
                              f"got {type(data).__name__}")
    try:
        content = BatchContent.model_validate(data)
    except ValidationError as e:
        raise BatchInputError(validation_message(e, f"invalid {source}")) from None
    if not content.prompts:
        raise BatchInputError(f"{source}: prompts is empty; give at least one prompt")
    if len(content.prompts) > MAX_PROMPTS:
        raise BatchInputError(f"{source}: {len(content.prompts)} prompts; the limit is {MAX_PROMPTS}")
    empty = [i for i, p in enumerate(content.prompts) if not p]
    if empty:
        raise BatchInputError(f"{source}: prompts {empty[:5]} are empty strings")
    return content


def read_content(path: Path, source: str = "input file") -> BatchContent:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BatchInputError(f"{source} {path} is not valid JSON: {e}") from None
    return parse_content(data, f"{source} {path}")


def sampling_params(content: BatchContent) -> SamplingParams:
    """The same rules as one `completions-sync` request (server.schemas.sampling_params_v1)."""
    fields = content.model_dump(exclude={"prompts"})
    try:
        return sampling_params_v1(CompletionV1Request(prompt="", **fields))
    except ApiError as e:
        raise BatchInputError(e.detail) from None


def output_record(text: str, num_prompt_tokens: int, num_completion_tokens: int,
                  tokens: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One prompt's entry of the output list (the official client's CompletionOutput)."""
    return {"text": text, "num_prompt_tokens": num_prompt_tokens, "num_completion_tokens": num_completion_tokens,
            "tokens": None if tokens is None else [{"token": t, "log_prob": lp} for t, lp in tokens]}


def offline_outputs(llm: LLM, prompts: list[str], params: SamplingParams) -> list[dict[str, Any]]:
    """`llmengine batch`: complete every prompt with `runtime.LLM` (progress bar on stderr) -> output list.
    Token texts come from the incremental detokenizer, as the server's deltas do (UTF-8 safe)."""
    records = []
    for i, (prompt, result) in enumerate(zip(prompts, llm.generate(list(prompts), params))):
        if result.finish_reason in ("abort", "timeout", "error"):
            raise RuntimeError(f"prompt {i}: generation ended with {result.finish_reason}: {result.error}")
        tokens = None
        if params.return_token_log_probs:
            prompt_ids = llm.tokenizer.encode(prompt, add_special_tokens=True)  # string prompts: it has one
            detok = IncrementalDetokenizer(llm.tokenizer, prompt_ids, params.skip_special_tokens)
            texts = [detok.add(t) for t in result.token_ids]
            if texts:
                texts[-1] += detok.flush()
            tokens = list(zip(texts, result.log_probs or []))
        records.append(output_record(result.text, result.num_prompt_tokens, result.num_completion_tokens, tokens))
    return records


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so that `path` is either absent/old or complete, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
