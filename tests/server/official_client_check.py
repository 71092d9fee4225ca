"""Run by test_server_clients.py in a subprocess whose PYTHONPATH starts with the official client
(scale-llm-engine, installed with --target into .venv/official-client: its top-level package `llmengine` would
collide with ours). Calls our server through it, unchanged, and prints what it got as one JSON line.

    python official_client_check.py MODEL [wrong-key]
"""

from __future__ import annotations

import asyncio
import json
import sys

import llmengine
from llmengine import Completion, Model
from llmengine.errors import BadRequestError, NotFoundError, UnauthorizedError

PROMPT = "Suggest a name for an icecream shop"


def error_name(call) -> str:
    try:
        call()
    except (BadRequestError, NotFoundError, UnauthorizedError) as e:
        return type(e).__name__
    return "no error"


async def async_calls(model: str) -> tuple[dict, list[dict]]:
    sync = await Completion.acreate(model=model, prompt=PROMPT, max_new_tokens=5, temperature=0.0)
    stream = await Completion.acreate(model=model, prompt=PROMPT, max_new_tokens=5, temperature=0.0, stream=True)
    chunks = [json.loads(chunk.json()) async for chunk in stream]
    return json.loads(sync.json()), chunks


def main() -> None:
    model = sys.argv[1]
    if len(sys.argv) > 2:  # only the auth check: a wrong key must be refused
        print(json.dumps({"wrong_key": error_name(lambda: Completion.create(model=model, prompt="a",
                                                                            max_new_tokens=1, temperature=0.0))}))
        return
    result: dict = {"client_file": llmengine.__file__}
    sync = Completion.create(model=model, prompt=PROMPT, max_new_tokens=5, temperature=0.0,
                             return_token_log_probs=True)
    result["sync"] = json.loads(sync.json())
    stream = Completion.create(model=model, prompt=PROMPT, max_new_tokens=5, temperature=0.0, stream=True)
    result["stream"] = [json.loads(chunk.json()) for chunk in stream]
    result["async_sync"], result["async_stream"] = asyncio.run(async_calls(model))
    result["model_get"] = json.loads(Model.get(model).json())
    result["model_list"] = [e.name for e in Model.list().model_endpoints]
    result["unknown_model"] = error_name(lambda: Completion.create(model="nope", prompt="a", max_new_tokens=1,
                                                                   temperature=0.0))
    result["top_k_0"] = error_name(lambda: Completion.create(model=model, prompt="a", max_new_tokens=1,
                                                             temperature=0.5, top_k=0))
    result["guided"] = error_name(lambda: Completion.create(model=model, prompt="a", max_new_tokens=1,
                                                            temperature=0.5, guided_regex="a("))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
