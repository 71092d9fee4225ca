"""Check completion parameters and build the request body, before anything is sent.

Bounds are the official client's (its request model's ``Field`` limits), plus ``top_k != 0``,
which that client lets through but every server rejects; failing here names the parameter.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ValidationError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """Require ``low <= value <= high`` (``low < value`` when ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    ok = _is_number(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValidationError(name, f"must be a number in {interval}, got {value!r}")


def resolve_model(model: str | None, model_name: str | None) -> str:
    """The endpoint name from ``model`` (current spelling) or ``model_name`` (the docs'); exactly one."""
    if model is not None and model_name is not None:
        raise ValidationError("model", "pass either model= or model_name=, not both")
    name = model if model is not None else model_name
    if not isinstance(name, str) or not name:
        raise ValidationError("model", f"a model name (model= or model_name=) is required, got {name!r}")
    return name


def check_timeout(timeout: float | None) -> None:
    """``timeout`` is a positive number of seconds, or ``None`` for no limit."""
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        raise ValidationError("timeout", f"must be a positive number of seconds or None, got {timeout!r}")


def completion_body(
    prompt: Any,
    max_new_tokens: Any,
    temperature: Any,
    stop_sequences: Any,
    return_token_log_probs: Any,
    presence_penalty: Any,
    frequency_penalty: Any,
    top_k: Any,
    top_p: Any,
    include_stop_str_in_output: Any,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
) -> dict[str, Any]:
    """Validate the parameters and return the JSON body: every field present, nulls included."""
    _check_guided(guided_json, guided_regex, guided_choice, guided_grammar)
    if not isinstance(prompt, str):
        raise ValidationError("prompt", f"must be a string, got {type(prompt).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValidationError("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
    _check_range("temperature", temperature, 0.0, 1.0)
    if stop_sequences is not None:
        if isinstance(stop_sequences, str):
            stop_sequences = [stop_sequences]
        if not isinstance(stop_sequences, (list, tuple)) or not all(
            isinstance(s, str) for s in stop_sequences
        ):
            raise ValidationError("stop_sequences", f"must be a list of strings, got {stop_sequences!r}")
        stop_sequences = list(stop_sequences)
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None:
            _check_range(name, value, 0.0, 2.0)
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1 or top_k == 0
    ):
        raise ValidationError("top_k", f"must be an integer >= 1, or -1 for all tokens, got {top_k!r}")
    if top_p is not None:
        _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    for name, value in (
        ("return_token_log_probs", return_token_log_probs),
        ("include_stop_str_in_output", include_stop_str_in_output),
    ):
        if value is not None and not isinstance(value, bool):
            raise ValidationError(name, f"must be True, False or None, got {value!r}")
    return {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "stop_sequences": stop_sequences,
        "return_token_log_probs": return_token_log_probs,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "top_k": top_k,
        "top_p": top_p,
        "include_stop_str_in_output": include_stop_str_in_output,
        "guided_json": guided_json,
        "guided_regex": guided_regex,
        "guided_choice": None if guided_choice is None else list(guided_choice),
        "guided_grammar": guided_grammar,
        "skip_special_tokens": True,
    }


def _check_guided(guided_json: Any, guided_regex: Any, guided_choice: Any, guided_grammar: Any) -> None:
    """The guided decoding fields' types, and at most one of them (the server checks the constraint itself)."""
    given = [name for name, value in (("guided_json", guided_json), ("guided_regex", guided_regex),
                                      ("guided_choice", guided_choice), ("guided_grammar", guided_grammar))
             if value is not None]
    if len(given) > 1:
        raise ValidationError(given[1], f"at most one guided decoding field per request, got {', '.join(given)}")
    if guided_json is not None and not isinstance(guided_json, dict):
        raise ValidationError("guided_json", f"must be a JSON schema as a dict, got {type(guided_json).__name__}")
    for name, value in (("guided_regex", guided_regex), ("guided_grammar", guided_grammar)):
        if value is not None and not isinstance(value, str):
            raise ValidationError(name, f"must be a string, got {type(value).__name__}")
    if guided_choice is not None and (not isinstance(guided_choice, (list, tuple))
                                      or not all(isinstance(c, str) for c in guided_choice)):
        raise ValidationError("guided_choice", f"must be a list of strings, got {guided_choice!r}")
