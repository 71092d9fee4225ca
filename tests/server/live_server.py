"""A real uvicorn (our GracefulServer) on a free loopback port in a background thread, and request helpers."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import uvicorn

from llmengine_runtime.server.serve import GracefulServer

LOG_LEVEL = "warning"
MODEL = "smollm2-135m-instruct"


class LiveServer:
    def __init__(self, app: Any, grace: float = 2.0) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level=LOG_LEVEL, timeout_graceful_shutdown=2,
                                timeout_keep_alive=30)
        self.server = GracefulServer(config, grace=grace)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    @property
    def state(self) -> Any:
        return self.app.state.server

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextlib.contextmanager
def serve(app: Any, grace: float = 2.0):
    live = LiveServer(app, grace).start()
    try:
        yield live
    finally:
        live.stop()


def llm_body(prompt: str = "Suggest a name for an icecream shop", max_new_tokens: int = 6, temperature: float = 0.0,
             **overrides: Any) -> dict:
    """The body exactly as scale-llm-engine 0.0.0b45 sends it: every field, nulls included."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature, "stop_sequences": None,
            "return_token_log_probs": False, "presence_penalty": None, "frequency_penalty": None, "top_k": None,
            "top_p": None, "include_stop_str_in_output": None, "guided_json": None, "guided_regex": None,
            "guided_choice": None, "guided_grammar": None, "skip_special_tokens": True}
    body.update(overrides)
    return body


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
