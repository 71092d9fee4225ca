"""Offline batch generation for scripts: the same scheduler and runner, driven in a plain loop.

    llm = LLM("smollm2-135m-instruct")
    for c in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_new_tokens=16)):
        print(c.text, c.finish_reason)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llmengine_runtime.runtime.engine import Engine
from llmengine_runtime.runtime.params import SamplingParams


@dataclass
class GenerationResult:
    """One prompt's whole generation, as `LLM.generate` returns it."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    error: str | None = None


class LLM:
    def __init__(self, model: str | Path, **engine_kwargs):
        self.engine = Engine(model, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.config = self.engine.config

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = True) -> list[GenerationResult]:
        """One completion per prompt, in order. All requests are validated before any runs."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        engine = self.engine
        base = engine.counters["requests_added"]
        seqs = [engine.make_sequence(prompt, p, f"offline-{base + i}")
                for i, (prompt, p) in enumerate(zip(prompts, params))]
        results = {seq.request_id: GenerationResult(seq.request_id, log_probs=[] if seq.params.return_token_log_probs
                                              else None) for seq in seqs}
        for seq in seqs:
            engine.add(seq)
        bar = tqdm(total=len(seqs), desc="generating", unit="req", disable=not progress)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    c = results[out.request_id]
                    c.text += out.text
                    c.token_ids += out.token_ids
                    if c.log_probs is not None and out.log_probs:
                        c.log_probs += out.log_probs
                    c.num_prompt_tokens, c.num_completion_tokens = out.num_prompt_tokens, out.num_completion_tokens
                    if out.finished:
                        c.finish_reason, c.error = out.finish_reason, out.error
                        bar.update(1)
        finally:
            bar.close()
            for seq in seqs:  # on an interrupt, leave nothing behind in the engine
                engine.abort(seq.request_id)
        return [results[seq.request_id] for seq in seqs]
