"""Tool calling on chat completions, the request side: `tools`, `tool_choice` and `parallel_tool_calls` become a
`ToolPlan` (what the chat template gets, and the guided-decoding constraint that enforces a call), and histories
with assistant `tool_calls` and `role: "tool"` results are checked against the chat template.

- `tool_choice: "none"` (or no tools): the tools go to a chat template that takes them (it may describe them to the
  model); a template that does not take tools is a 400, since the tools would otherwise be dropped.
- `"required"`: the answer is a JSON array of `{"name", "parameters"}` calls (one with `parallel_tool_calls:
  false`), each name one of the tools' and its parameters valid against that tool's schema, enforced by the guided
  JSON path (runtime/guided.py) from the tools' parameter schemas; no parser needed.
- a named tool (`{"type": "function", "function": {"name": ...}}`): the answer is that tool's arguments, a JSON
  object valid against its parameter schema.
- `"auto"` (OpenAI's default with tools): the model decides; needs the server's `--tool-call-parser hermes`, which
  reads `<tool_call>{json}</tool_call>` blocks out of the answer (tool_calls.py), and a template that takes tools.

The answers' side (tool_calls in messages and stream deltas) is in tool_calls.py.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from llmengine_runtime.server.errors import bad_request

TOOL_PARSERS = ("hermes",)


@dataclass
class ToolPlan:
    choice: str  # "none" | "auto" | "required" | "named"
    tools: list[dict] | None = None  # OpenAI's tool objects, for the chat template (None: none given)
    name: str | None = None  # the named tool
    parallel: bool = True
    constraint: dict | None = None  # the JSON schema the answer must follow ("required", "named")


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


def _function(tool: Any, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad_request(f"{where}: only function tools are supported "
                          '({"type": "function", "function": {"name": ..., "parameters": {...}}})')
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"{where}.function.name must be a non-empty string")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{where}.function.parameters must be a JSON schema object")
    return function


def _parameters(function: dict, defs: dict) -> dict:
    """A tool's parameter schema ({} -> any object), its $defs moved to `defs` (the root of the combined schema)."""
    schema = copy.deepcopy(function.get("parameters") or {"type": "object", "properties": {}})
    for name, definition in schema.pop("$defs", {}).items():
        if defs.setdefault(name, definition) != definition:
            raise bad_request(f"tools: two tools define $defs {name!r} differently; give them distinct names")
    return schema


def required_schema(functions: list[dict], parallel: bool) -> dict:
    """A JSON array of at least one call; each item is one tool's `{"name", "parameters"}`."""
    defs: dict = {}
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": _parameters(f, defs)},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, template: str | None,
               parser: str | None) -> ToolPlan:
    """The request's tool plan, or a 400 naming what cannot be served."""
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools")
    functions = [_function(tool, i) for i, tool in enumerate(tools or [])]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request(f"tools: two tools are named {next(n for n in names if names.count(n) > 1)!r}")
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    parallel = parallel_tool_calls is not False
    if choice == "required" and not functions:
        choice = "none"  # as OpenAI and vLLM: nothing to require
    plan = ToolPlan("none", tools if functions else None, parallel=parallel)
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise bad_request('tool_choice: a named tool is {"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among tools ({', '.join(names) or 'none'})")
        defs: dict = {}
        plan.choice, plan.name = "named", name
        plan.constraint = _parameters(functions[names.index(name)], defs)
        if defs:
            plan.constraint["$defs"] = defs
    elif choice == "required":
        plan.choice, plan.constraint = "required", required_schema(functions, parallel)
    elif choice == "auto":
        if not functions:
            raise bad_request("tool_choice 'auto' needs tools")
        if parser is None:
            raise bad_request("tool_choice 'auto' (the default with tools) needs the server started with "
                              f"--tool-call-parser ({', '.join(TOOL_PARSERS)}); or send tool_choice 'required', a "
                              "named tool, or 'none'")
        plan.choice = "auto"
    elif choice != "none":
        raise bad_request(f"tool_choice={choice!r} is not accepted: none, auto, required or a named tool")
    if plan.choice in ("none", "auto") and functions and not template_takes_tools(template):
        raise bad_request("tools: the model's chat template does not take tools, so they would not reach the model; "
                          "use tool_choice 'required' or a named tool (enforced by the answer's format instead)")
    return plan


def check_history(messages: list[dict], template: str | None) -> None:
    """400 when the history holds tool calls or tool results the chat template cannot show the model."""
    template = template or ""
    for i, message in enumerate(messages):
        if message.get("tool_calls") and "tool_calls" not in template:
            raise bad_request(f"messages[{i}].tool_calls: the model's chat template does not render tool calls")
        if message.get("role") == "tool" and not re.search(r"""["']tool["']""", template):
            raise bad_request(f"messages[{i}]: the model's chat template does not render role 'tool' messages")


def history_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls as templates read them: arguments parsed from their JSON string."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{j}].function.name must be a string")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise bad_request(f"{where}.tool_calls[{j}].function.arguments is not JSON") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out
