"""Run by test_server_guided.py in a subprocess whose PYTHONPATH starts with the official client (as
official_client_check.py): each of its four guided decoding fields, sync, async and streamed, and an invalid
constraint; prints the texts (and the error's class) as one JSON line.

    python official_client_guided_check.py MODEL
"""

from __future__ import annotations

import asyncio
import json
import sys

import llmengine
from llmengine import Completion
from llmengine.errors import BadRequestError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "size"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}}
GRAMMAR = '?start: "SELECT " COL " FROM " TABLE\nCOL: "id" | "name"\nTABLE: "users" | "orders"'
CALLS = {
    "json": ("A large blue shirt, as JSON:", {"guided_json": SCHEMA}),
    "regex": ("The pets:", {"guided_regex": r"(cat|dog)s? (are|is) (cute|loud)"}),
    "choice": ("The capital of France is", {"guided_choice": ["Paris", "London", "Berlin"]}),
    "grammar": ("The SQL query that lists the names of all users:", {"guided_grammar": GRAMMAR}),
}


async def async_calls(model: str) -> tuple[str, str]:
    prompt, fields = CALLS["json"]
    sync = await Completion.acreate(model=model, prompt=prompt, max_new_tokens=64, temperature=0.0, **fields)
    prompt, fields = CALLS["choice"]
    stream = await Completion.acreate(model=model, prompt=prompt, max_new_tokens=64, temperature=0.0, stream=True,
                                      **fields)
    return sync.output.text, "".join([chunk.output.text async for chunk in stream if chunk.output])


def main() -> None:
    model = sys.argv[1]
    result: dict = {"client_file": llmengine.__file__}
    for name, (prompt, fields) in CALLS.items():
        response = Completion.create(model=model, prompt=prompt, max_new_tokens=64, temperature=0.0, **fields)
        result[name] = response.output.text
    stream = Completion.create(model=model, prompt=CALLS["regex"][0], max_new_tokens=64, temperature=0.0, stream=True,
                               **CALLS["regex"][1])
    result["regex_stream"] = "".join(chunk.output.text for chunk in stream if chunk.output)
    result["async_json"], result["async_choice_stream"] = asyncio.run(async_calls(model))
    try:
        Completion.create(model=model, prompt="a", max_new_tokens=4, temperature=0.0, guided_regex="(a")
        result["invalid"] = "no error"
    except BadRequestError as e:
        result["invalid"] = type(e).__name__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
