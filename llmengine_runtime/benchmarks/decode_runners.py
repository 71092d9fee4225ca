"""The timed generate loops of benchmarks.decode, one per implementation (ours, transformers, llama.cpp), and what
their runs sum up to: each returns a `Run` (per-sequence first-token times, step times, tokens), and `summarize_runs`
turns a list of them into TTFT, TPOT, tok/s and the weight bandwidth (definitions in benchmarks/decode.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmengine_runtime.benchmarks.common import spread, synchronize


@dataclass
class Run:
    """One timed generate call over a batch."""

    ttft: float  # seconds, mean over sequences
    decode_time: float  # from the moment every sequence had its first token to the last token
    decode_steps: int
    decode_tokens: int
    total_time: float
    output_tokens: int
    token_ids: list[list[int]]


def run_ours(llm, prompts: list[list[int]], params, device: torch.device) -> Run:
    """Drive the engine step by step so each token's arrival time is known."""
    engine = llm.engine
    seqs = [engine.make_sequence(p, params, f"bench-{i}-{time.monotonic_ns()}") for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    first: dict[str, float] = {}
    steps: list[tuple[float, int]] = []  # (time, tokens that step)
    synchronize(device)
    t0 = time.perf_counter()
    for seq in seqs:
        engine.add(seq)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()  # the sampler's token ids are on the host: the step is done
        n = 0
        for out in outs:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.token_ids:
                first.setdefault(out.request_id, now)
                tokens[out.request_id] += out.token_ids
                n += len(out.token_ids)
        if n:
            steps.append((now, n))
    all_first = max(first.values())
    decode = [(t, n) for t, n in steps if t > all_first]
    ids = [tokens[s.request_id] for s in seqs]
    return Run(ttft=sum(t - t0 for t in first.values()) / len(first), decode_time=steps[-1][0] - all_first,
               decode_steps=len(decode), decode_tokens=sum(n for _, n in decode),
               total_time=steps[-1][0] - t0, output_tokens=sum(map(len, ids)), token_ids=ids)


def run_hf(model, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool, stop: set[int],
           device: torch.device) -> Run:
    """transformers generate, greedy; a streamer stamps the time of each step's tokens."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):  # first call: the prompt; then one call per step with the batch's new tokens
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    input_ids = torch.tensor(prompts, device=device)
    pad = min(stop) if stop else 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, streamer=clock)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens  # eos is masked until then: never stops early
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    synchronize(device)
    ids = []
    for row in out[:, input_ids.shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row)) if not ignore_eos else len(row)
        ids.append(row[:end])
    times = clock.times
    output_tokens = sum(map(len, ids))
    return Run(ttft=times[1] - t0, decode_time=times[-1] - times[1], decode_steps=len(times) - 2,
               decode_tokens=output_tokens - len(ids), total_time=times[-1] - t0, output_tokens=output_tokens,
               token_ids=ids)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all parameters and quantized weights (QuantizedLinear buffers: not
    parameters; FloatLinear's too), but the embedding table unless it is also the (float) head."""
    from llmengine_runtime.models.float_linear import FloatLinear
    from llmengine_runtime.models.quantized_linear import QuantizedLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, (QuantizedLinear, FloatLinear))
                 for b in m.buffers(recurse=False))
    if model.lm_head is not None or getattr(model, "quantized_head", None) is not None:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def hf_decode_weight_bytes(model) -> int:
    """decode_weight_bytes for a transformers model: every parameter (a tied head's once), less the embedding
    table when the head is a weight of its own."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is not None and head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def run_llamacpp_batch(llm, prompts: list[list[int]], max_new_tokens: int) -> Run:
    """benchmarks/llamacpp.py's run as a Run."""
    from llmengine_runtime.benchmarks.llamacpp import run_llamacpp

    [prompt] = prompts  # llama-cpp-python's high-level API runs one sequence
    r = run_llamacpp(llm, prompt, max_new_tokens)
    return Run(ttft=r.ttft, decode_time=r.decode_time, decode_steps=r.decode_tokens, decode_tokens=r.decode_tokens,
               total_time=r.ttft + r.decode_time, output_tokens=len(r.token_ids), token_ids=[r.token_ids])


def summarize_runs(runs: list[Run], weight_bytes: int, copy_bw: float) -> dict:
    tpot = [r.decode_time / r.decode_steps if r.decode_steps else float("nan") for r in runs]
    decode_tok_s = [r.decode_tokens / r.decode_time if r.decode_time > 0 else float("nan") for r in runs]
    weight_bw = [weight_bytes / t for t in tpot]
    return {
        "ttft_ms": spread([r.ttft * 1e3 for r in runs]),
        "tpot_ms": spread([t * 1e3 for t in tpot]),
        "decode_tok_s": spread(decode_tok_s),
        "total_tok_s": spread([r.output_tokens / r.total_time for r in runs]),
        "weight_gb_s": spread([b / 1e9 for b in weight_bw]),
        "weight_bw_pct_of_copy": 100 * spread(weight_bw)["median"] / copy_bw,
        "output_tokens": runs[0].output_tokens,
        "decode_steps": runs[0].decode_steps,
    }
