"""What the speculative-engine tests share: engines on tiny checkpoints, a run loop that checks the block
accounting every step, and a record of what each verification emitted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine

BS = 4
# Prompts that repeat a pattern, so that n-gram proposals happen even on random tiny models.
PATTERN_PROMPTS = [[5, 6, 7, 8] * 3, [20, 21, 22] * 3 + [20], [40 + i % 5 for i in range(11)]]


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    deltas: int = 0
    last_token_ids: list[int] = field(default_factory=list)  # the tokens of the final delta


def make_engine(folder: Path, cache_gib, num_blocks: int = 64, **kwargs) -> Engine:
    return Engine(folder, device="cpu", block_size=BS, kv_cache_gib=cache_gib(folder, num_blocks, BS), **kwargs)


def run(engine: Engine, prompts: list, params: SamplingParams | list[SamplingParams],
        steps_between: int = 0) -> list[Result]:
    """Generate, adding the prompts `steps_between` steps apart (0: all at once); check the blocks every step
    and that every block is back at the end."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    results: dict[str, Result] = {}
    pending = list(enumerate(zip(prompts, params)))
    while pending or engine.has_unfinished():
        if pending:
            i, (prompt, p) = pending.pop(0)
            results[engine.add_request(prompt, p, request_id=f"r{i}").request_id] = Result()
            if steps_between == 0:
                continue
        for _ in range(max(steps_between, 1)):
            for out in engine.step():
                r = results[out.request_id]
                r.token_ids += out.token_ids
                r.log_probs += out.log_probs or []
                r.text += out.text
                r.deltas += 1
                if out.finished:
                    r.finish_reason, r.last_token_ids = out.finish_reason, out.token_ids
                assert out.error is None, out.error
            engine.block_manager.check(list(engine.requests.values()))
    engine.block_manager.check([])
    assert engine.block_manager.num_used == 0
    return [results[f"r{i}"] for i in range(len(prompts))]


def record_verifications(engine: Engine, monkeypatch) -> list[dict[str, list[int]]]:
    """Per speculating step: request id -> the tokens verification emitted for it (before any stop cut them)."""
    steps: list[dict[str, list[int]]] = []
    verify = engine.speculator.verify

    def recording(seqs, logits, num_rows, *rest):
        tokens, log_probs, tops = verify(seqs, logits, num_rows, *rest)
        steps.append({seq.request_id: t for seq, t, n in zip(seqs, tokens, num_rows) if n > 1})
        return tokens, log_probs, tops

    monkeypatch.setattr(engine.speculator, "verify", recording)
    return steps


def spec_stats(engine: Engine) -> tuple[int, int, int]:
    stats = engine.stats()
    return stats["spec_proposed_tokens"], stats["spec_accepted_tokens"], stats["spec_steps"]
