"""Tool calling on chat completions, the answer's side: one choice's generated text as OpenAI's `tool_calls`, in
the whole message and as stream deltas (the request's side, `ToolPlan`, is in tools.py).

- named tool: the text is the arguments; the stream sends the call's id and name first, then the arguments as they
  come (`{"tool_calls": [{"index": 0, "function": {"arguments": "..."}}]}`), as OpenAI's does. Finish reason "stop".
- required: the text is a JSON array of `{"name", "parameters"}`; the stream sends the calls once the array is
  complete. Finish reason "tool_calls".
- auto, `--tool-call-parser hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks are calls,
  the text around them content; the stream sends content until a block starts (holding back what may be the
  start of `<tool_call>`), then the calls when the answer ends. Finish reason "tool_calls" when it called one.

An answer cut short (max_tokens) whose calls do not parse stays content, with its finish reason "length".
"""

from __future__ import annotations

import json
import re
import uuid

from llmengine_runtime.server.tools import ToolPlan

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: object, index: int | None = None) -> dict:
    call = {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
    return call if index is None else {"index": index, **call}


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a hermes-style answer: the content is the text before the first call (as vLLM's
    parser); a block that is not a JSON call is no call. Without calls the whole text is the content."""
    calls, first = [], None
    for match in _HERMES.finditer(text):
        try:
            body = json.loads(match.group(1))
            name, arguments = body["name"], body.get("arguments", body.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        first = match.start() if first is None else first
        calls.append(_call(name, arguments))
    return (text[:first].strip() if calls else text), calls


def parse_required(text: str) -> list[dict] | None:
    try:
        items = json.loads(text)
        return [_call(item["name"], item.get("parameters", {})) for item in items]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class ToolCallOutput:
    """One choice's answer under a tool plan whose choice is not "none"."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # hermes: content characters streamed
        self.named_id = call_id()
        self.named_started = False

    def message(self, text: str) -> tuple[dict, bool]:
        """(the message's content and tool_calls, whether it called a tool) for the whole answer."""
        if self.plan.choice == "named":
            return {"content": None, "tool_calls": [_call(self.plan.name, text) | {"id": self.named_id}]}, True
        if self.plan.choice == "required":
            calls = parse_required(text)
            return ({"content": None, "tool_calls": calls}, True) if calls else ({"content": text}, False)
        content, calls = parse_hermes(text)
        if calls and not self.plan.parallel:
            calls = calls[:1]
        return ({"content": content or None, "tool_calls": calls}, True) if calls else ({"content": text}, False)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        if called and self.plan.choice in ("required", "auto") and reason == "stop":
            return "tool_calls"
        return reason

    def deltas(self, text: str, finished: bool) -> tuple[list[dict], bool]:
        """The stream deltas for new text (and, when finished, the rest): ([delta, ...], whether it called a tool)."""
        self.text += text
        if self.plan.choice == "named":
            out = []
            if not self.named_started:
                self.named_started = True
                out.append({"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                            "function": {"name": self.plan.name, "arguments": ""}}]})
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out, True
        if self.plan.choice == "required":
            if not finished:
                return [], False
            calls = parse_required(self.text)
            if not calls:
                return [{"content": self.text}], False
            return [{"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}], True
        return self._hermes_deltas(finished)

    def _hermes_deltas(self, finished: bool) -> tuple[list[dict], bool]:
        start = self.text.find(OPEN)
        calls: list[dict] = []
        if finished:
            calls = parse_hermes(self.text)[1][:None if self.plan.parallel else 1]
            end = start if calls else len(self.text)
        else:
            end = start if start >= 0 else len(self.text) - _partial_open(self.text)
        out = []
        if end > self.sent:
            out.append({"content": self.text[self.sent:end]})
            self.sent = end
        if calls:
            out.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        return out, bool(calls)


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
