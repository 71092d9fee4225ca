"""A fake AsyncEngine for the server tests that need control a model cannot give: exact timing, failures
mid-stream, many requests held in flight. It obeys runtime.AsyncEngine's API.

Output for a prompt of N words: tokens " w0", " w1", ... (one per `delay` seconds) up to max_new_tokens.
Prompts that steer it:
- "fail-after K ...": K tokens, then finished with finish_reason "error" (error "boom");
- "raise-after K ...": K tokens, then the iterator raises RuntimeError;
- "fail-others-after K ...": as fail-after, but a request whose id ends in "-0" (choice 0 of n) runs on;
- "quiet ...": every other delta has a token but no text (the detokenizer holding bytes back).
`engine.reply = [text, ...]` scripts the answer instead: one delta per text, then finish reason "stop".
Each request holds 1 block, plus 1 per 4 tokens, until it finishes or is aborted. A prompt of token ids
steers it as the words they encode (FakeTokenizer: one id per distinct word).

`FakeEngine(chat_template="fake")` has a chat template: each message renders as "CONTENT <|ROLE|>", then
"<|assistant|>"; without one, apply_chat_template raises as the real tokenizer does. It records the extra
template variables it was given (`tokenizer.template_kwargs`).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from types import SimpleNamespace

from llmengine_runtime.runtime import RequestOutput, SamplingParams


class FakeTokenizer:
    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template
        self.eos_token_id = 0
        self._ids: dict[str, int] = {}
        self.special_tokens_added: list[bool] = []  # add_special_tokens of every encode() call
        self.template_kwargs: list[dict] = []  # the extra variables of every apply_chat_template() call
        self.messages: list[list[dict]] = []  # the messages of every apply_chat_template() call

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.special_tokens_added.append(add_special_tokens)
        return [self._ids.setdefault(word, len(self._ids) + 1) for word in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        words = {i: w for w, i in self._ids.items()}
        return " ".join(words[i] for i in ids if i in words)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this fake tokenizer has no chat_template")
        self.template_kwargs.append(kwargs)
        self.messages.append(messages)
        text = " ".join(f"{m['content']} <|{m['role']}|>" for m in messages)
        return text + " <|assistant|>" if add_generation_prompt else text


class FakeEngine:
    def __init__(self, name: str = "fake", delay: float = 0.01, max_model_len: int = 64, blocks_total: int = 100,
                 chat_template: str | None = None):
        self.name = name
        self.delay = delay
        self.max_model_len = max_model_len
        self.config = SimpleNamespace(max_position_embeddings=max_model_len, arch="fake")
        self.tokenizer = FakeTokenizer(chat_template)
        self.blocks_total = blocks_total
        self._lock = threading.Lock()
        self._blocks: dict[str, int] = {}  # request id -> blocks held
        self._aborted: set[str] = set()
        self.aborts: list[str] = []  # every abort() call, in order
        self.requests: list[tuple[str | list[int], SamplingParams]] = []
        self.request_ids: list[str] = []
        self.started = False
        self.shut_down = False
        self.failed: str | None = None  # set it to play an engine whose tensor-parallel worker died
        self.reply: list[str] | None = None  # a scripted answer: one delta per text, then "stop"

    def start(self) -> None:
        self.started = True

    def shutdown(self, timeout: float = 5.0) -> None:
        self.shut_down = True
        with self._lock:
            self._aborted.update(self._blocks)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.aborts.append(request_id)
            if request_id in self._blocks:
                self._aborted.add(request_id)
                del self._blocks[request_id]  # freed at once, as the real engine does

    def failure(self) -> str | None:
        return self.failed

    def stats(self) -> dict:
        with self._lock:
            used = sum(self._blocks.values())
            return {"num_running": len(self._blocks), "num_waiting": 0, "blocks_total": self.blocks_total,
                    "blocks_used": used, "blocks_free": self.blocks_total - used}

    def add_request(self, prompt, params: SamplingParams, request_id=None, deadline=None, stream=True):
        params.validate()
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        if n_prompt == 0:
            raise ValueError("prompt is empty (0 tokens)")
        total = n_prompt + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"tokens, but the model's context is {self.max_model_len} tokens")
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            self._blocks[request_id] = 1
        self.requests.append((prompt, params))
        self.request_ids.append(request_id)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        return self._generate(request_id, text, n_prompt, params)

    async def _generate(self, rid: str, prompt: str, n_prompt: int, params: SamplingParams):
        words = prompt.split()
        steered = len(words) > 1 and (words[0] in ("fail-after", "raise-after")
                                      or words[0] == "fail-others-after" and not rid.endswith("-0"))
        fail_at = int(words[1]) if steered else None
        n = 0
        try:
            while True:
                await asyncio.sleep(self.delay)
                with self._lock:
                    if rid in self._aborted:
                        yield RequestOutput(rid, "", [], None, True, "abort", n_prompt, n, None)
                        return
                if fail_at is not None and n == fail_at:
                    if words[0] == "raise-after":
                        raise RuntimeError("engine exploded")
                    yield RequestOutput(rid, "", [], None, True, "error", n_prompt, n, "boom")
                    return
                text = "" if words and words[0] == "quiet" and n % 2 == 0 else f" w{n}"
                if self.reply is not None:
                    text = self.reply[n]
                n += 1
                with self._lock:
                    self._blocks[rid] = 1 + n // 4
                said = self.reply is not None and n >= len(self.reply)
                done = n >= params.max_new_tokens or said
                log_probs = [-0.5 * n] if params.return_token_log_probs else None
                reason = ("stop" if said else "length") if done else None
                yield RequestOutput(rid, text, [n], log_probs, done, reason, n_prompt, n, None)
                if done:
                    return
        finally:
            with self._lock:
                self._blocks.pop(rid, None)
