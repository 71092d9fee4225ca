"""The one-call CPU decode step (models/fused_decode.py) gives the eager blocks' numbers exactly (the same C++
kernels in the same order), on every tiny Llama variant it takes; the others keep the eager path (Falcon's forms:
test_fused_falcon.py)."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.models.fused_decode import FusedDecode
from llmengine_runtime.models.row_interleave import deinterleave8_q8, interleave8_q8
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.executor import CpuStepExecutor
from tests.fast import fast_subset

PROMPTS = [[5, 17, 99, 3, 64, 8, 21], [7, 100, 2, 45], [9] * 40]  # 40 tokens: past a 16-token block
ELIGIBLE = ["llama-mha", "llama-gqa-tied-bias", "llama-mqa-linear", "llama3-rope"]



def run(path, quantize: str | None, fused: bool, monkeypatch, prompts=PROMPTS, n: int = 20,
        threads: int = 2, kv_cache_dtype: str = "auto") -> tuple[list, bool]:
    monkeypatch.setenv("LLMENGINE_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(path, quantize=quantize, block_size=16, cpu_threads=threads, kv_cache_dtype=kv_cache_dtype)
    if kv_cache_dtype != "auto":
        assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, kv_cache_dtype)
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    results = llm.generate(prompts, params, progress=False)
    took = isinstance(llm.engine.runner.executor, CpuStepExecutor)
    return [(r.token_ids, r.log_probs) for r in results], took


@pytest.mark.parametrize("variant", fast_subset(ELIGIBLE, ["llama-gqa-tied-bias"]))
@pytest.mark.parametrize("mode", fast_subset(["int4", "int8"], ["int4"]))
@pytest.mark.parametrize("kv", fast_subset(["float16", "float32"], ["float16"]))
def test_fused_decode_matches_eager(tiny_dirs, variant, mode, kv, monkeypatch):
    """Both KV-cache types: fp16 (what "auto" gives quantized weights on CPU) and fp32."""
    fused, took = run(tiny_dirs[variant], mode, True, monkeypatch, kv_cache_dtype=kv)
    eager, took_eager = run(tiny_dirs[variant], mode, False, monkeypatch, kv_cache_dtype=kv)
    assert took and not took_eager
    assert fused == eager  # tokens and log-probs, bit for bit


def chunks_and_verification(path, speculative: str | None, monkeypatch) -> tuple[dict[str, list], list]:
    """Greedy tokens and log-probs with the C++ step ("1") and the eager blocks ("0") for prompt chunks of 5 tokens
    (so steps mix a chunk with decode rows) or n-gram verification rows; and each C++ step's (sequences, tokens)."""
    prompts = [[5, 17, 99, 3, 64, 8, 21, 5, 17, 99, 3, 64, 8], [7, 100, 2, 45] * 5, [9] * 40]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    results, shapes = {}, []
    calls = FusedDecode.step_buffers

    def recording(self, buffers, kv_caches, argmax):
        shapes.append((buffers.rows, buffers.num_tokens))
        calls(self, buffers, kv_caches, argmax)

    monkeypatch.setattr(FusedDecode, "step_buffers", recording)
    for fused in ("1", "0"):
        monkeypatch.setenv("LLMENGINE_FUSED_DECODE", fused)
        llm = LLM(path, quantize="int4", block_size=16, cpu_threads=2,
                  max_num_batched_tokens=5 if speculative is None else 2048, speculative=speculative,
                  enable_prefix_caching=False)
        results[fused] = [(r.token_ids, r.log_probs) for r in llm.generate(prompts, params, progress=False)]
        if speculative and fused == "1":
            assert llm.engine.stats()["spec_accepted_tokens"] > 0
    return results, shapes


@pytest.mark.parametrize("speculative", fast_subset([None, "ngram"], ["ngram"]))
def test_the_cpp_step_takes_prompt_chunks_and_verification(tiny_dirs, speculative, monkeypatch):
    """Prompt chunks and n-gram verification rows go through the C++ step, several rows per sequence, with the eager
    path's numbers."""
    results, shapes = chunks_and_verification(tiny_dirs["llama-gqa-tied-bias"], speculative, monkeypatch)
    assert results["1"] == results["0"]
    assert any(tokens > seqs for seqs, tokens in shapes)  # several rows for a sequence, in one C++ step


LONG_PROMPTS = [[(7 * i + 3 * j) % 120 + 3 for j in range(n)] for i, n in enumerate([100, 61, 90])]


@pytest.mark.parametrize("variant", fast_subset(["llama-gqa-tied-bias", "falcon-rw-like"], ["llama-gqa-tied-bias"]))
@pytest.mark.parametrize("mode", fast_subset(["int4", "int8"], ["int4"]))
@pytest.mark.parametrize("threads", fast_subset([2, 3], [2]))
def test_a_step_of_many_rows_shares_the_quantization(tiny_dirs, variant, mode, threads, monkeypatch):
    """251 prompt rows in one step (at least TEAM_ROWS, decoder.h): each thread quantizes its share of the rows for
    the whole team (2 threads, and 3 with uneven shares); the numbers stay the eager path's."""
    before = torch.get_num_threads()
    try:
        fused, took = run(tiny_dirs[variant], mode, True, monkeypatch, LONG_PROMPTS, 8, threads=threads)
        eager, _ = run(tiny_dirs[variant], mode, False, monkeypatch, LONG_PROMPTS, 8, threads=threads)
    finally:
        torch.set_num_threads(before)
    assert took and fused == eager


@pytest.mark.slow  # two more engines per case
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_decode_matches_eager_with_other_thread_counts(tiny_dirs, threads, monkeypatch):
    """The step's team splits rows and attention tasks by its size: 1 thread, and 3 (uneven shares) on 2 cores."""
    before = torch.get_num_threads()
    try:
        fused, took = run(tiny_dirs["llama-gqa-tied-bias"], "int4", True, monkeypatch, threads=threads)
        eager, _ = run(tiny_dirs["llama-gqa-tied-bias"], "int4", False, monkeypatch, threads=threads)
    finally:
        torch.set_num_threads(before)
    assert took and fused == eager


@pytest.mark.parametrize("variant, quantize", fast_subset([("llama-dynamic", "int4"), ("llama-mha", None)],
                                                          [("llama-dynamic", "int4")]))
def test_fused_decode_declines(tiny_dirs, variant, quantize, monkeypatch):
    """Dynamic RoPE and fp32 weights (oneDNN's packed products) keep the eager blocks (Falcon runs the step:
    test_fused_falcon.py)."""
    _, took = run(tiny_dirs[variant], quantize, True, monkeypatch, PROMPTS[:2], 8)  # llama-dynamic: 24 positions
    assert not took


@pytest.mark.slow
def test_fused_decode_without_kernels(tiny_dirs, monkeypatch):
    monkeypatch.setenv("LLMENGINE_CPU_KERNELS", "0")  # torch's quantized kernels: nothing to fuse
    _, took = run(tiny_dirs["llama-mha"], "int4", True, monkeypatch)
    assert not took
    assert torch.ops.llmengine_cpu.q4_linear is not None  # the library stays loaded; only the choice changes


def test_decode_step_profile_times_the_parts(tiny_dirs, monkeypatch):
    """With the C++ timers on, each fused step counts once and its parts add up to no more than the step."""
    llm = LLM(tiny_dirs["llama-gqa-tied-bias"], quantize="int4", block_size=16, cpu_threads=2)
    params = SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPTS[0]], params, progress=False)  # binds the decoder
    torch.ops.llmengine_cpu.decode_step_profile(True)
    llm.generate([PROMPTS[0]], params, progress=False)  # a prefill, then 8 decode steps, all in the C++ step
    seconds = torch.ops.llmengine_cpu.decode_step_profile(False).tolist()
    parts, step, steps = seconds[:7], seconds[7], seconds[8]  # the 7th part: the head, which int4 quantized too
    assert steps == 9
    assert all(p > 0 for p in parts) and sum(parts) <= step
    llm.generate([PROMPTS[0]], params, progress=False)
    assert torch.ops.llmengine_cpu.decode_step_profile(False).tolist() == [0.0] * 9  # off: nothing counted


def test_the_engine_sizes_the_rotary_table_once(tiny_dirs):
    """The fused step passes the table as it is: the engine reserves it for its max model length, with the same
    angles the table had (and would have grown to)."""
    llm = LLM(tiny_dirs["llama-gqa-tied-bias"], quantize="int4", block_size=16, cpu_threads=2, max_model_len=300,
              kv_cache_gib=0.01)
    rope = llm.engine.model.rope
    assert rope.cos_sin_cache.shape[0] >= llm.engine.max_model_len
    before = rope.cos_sin_cache.clone()
    rope.reserve(2 * before.shape[0])
    assert rope.cos_sin_cache.shape[0] == 2 * before.shape[0]
    assert torch.equal(rope.cos_sin_cache[:before.shape[0]], before)
    table, _ = rope.cos_sin(torch.tensor([0]))
    assert table is rope.cos_sin_cache  # no growth, no copy, per step


@pytest.mark.slow  # four engines; `make test-fast` checks the fused head against the eager path above
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_head_gives_compute_logits_numbers(tiny_dirs, mode, monkeypatch):
    """The head's product in the step (a quantized head) against the step without it and `compute_logits` after:
    tokens and log-probs bit for bit, and greedy requests without log-probs (the step's argmax) the same tokens."""
    results = {}
    for has_head in (True, False):
        llm = LLM(tiny_dirs["llama-gqa-tied-bias"], quantize=mode, block_size=16, cpu_threads=2)
        runner = llm.engine.runner
        assert isinstance(runner.executor, CpuStepExecutor) and runner.executor.fused.has_head
        if not has_head:  # the C++ step without its head: its hidden states, then compute_logits
            runner.executor = CpuStepExecutor(runner.executor.eager, FusedDecode.build(llm.engine.model))
            runner.executor.fused.has_head = False
            runner.executor.head_buffers = None
        out = []
        for log_probs in (True, False):
            params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                    return_token_log_probs=log_probs)
            out += [(r.token_ids, r.log_probs) for r in llm.generate(PROMPTS, params, progress=False)]
        results[has_head] = out
    assert results[True] == results[False]


@pytest.mark.parametrize("threads", fast_subset([2, 3], [2]))
@pytest.mark.parametrize("nan_rows", fast_subset([[], [-1], [2, -1]], [[2, -1]]))
def test_fused_head_argmax_is_torch_argmax(tiny_dirs, threads, nan_rows, monkeypatch):
    """Each thread takes the argmax of its own head rows; merged, it is torch.argmax's: with every row equal (every
    logit ties) the lowest index, across the threads' shares; with NaN rows, the first NaN."""
    before = torch.get_num_threads()
    try:
        llm = LLM(tiny_dirs["llama-gqa-tied-bias"], quantize="int8", block_size=16, cpu_threads=threads)
        head = llm.engine.model.quantized_head
        interleaved = head.w_int8.dim() == 3  # rows interleaved by eights (models/row_interleave.py)
        qs, d = deinterleave8_q8(head.w_int8, head.d) if interleaved else (head.w_int8, head.d)
        qs, d = qs[:1].expand_as(qs).clone(), d[:1].expand_as(d).clone()  # every row the first one
        for row in nan_rows:
            d[row] = float("nan")
        with torch.no_grad():
            for target, value in zip((head.w_int8, head.d), interleave8_q8(qs, d) if interleaved else (qs, d)):
                target.copy_(value)
        seen = []
        step = FusedDecode.step_buffers

        def recording(self, buffers, kv_caches, argmax):
            step(self, buffers, kv_caches, argmax)
            seen.append((buffers.step_logits().clone(), torch.tensor(buffers.step_argmax())))

        monkeypatch.setattr(FusedDecode, "step_buffers", recording)
        params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        tokens = [r.token_ids for r in llm.generate(PROMPTS[:2], params, progress=False)]
    finally:
        torch.set_num_threads(before)
    vocab = head.out_features
    expected = sorted(r % vocab for r in nan_rows)[0] if nan_rows else 0
    assert len(seen) == 6 and all(torch.equal(argmax, logits.argmax(-1)) for logits, argmax in seen)  # prefill too
    assert all((argmax == expected).all() for _, argmax in seen)
    assert tokens == [[expected] * 6] * 2


def test_amx_tiles_leave_the_numbers_as_they_were(tiny_dirs, monkeypatch):
    """Prompts of 40 and 20 tokens give steps of 16 rows and more, which go to AMX int8 tiles where the CPU has them
    (kernels/cpu/amx_interleaved.cpp), beside single decode rows: tokens and log-probs are the vector path's."""
    ops = torch.ops.llmengine_cpu
    prompts = [[9] * 40, [7, 100, 2, 45] * 5, [3, 1, 4]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    llm = LLM(tiny_dirs["llama-gqa-tied-bias"], quantize="int4", block_size=16, cpu_threads=2,
              enable_prefix_caching=False)
    before = ops.amx_enabled()
    if not ops.set_amx(True):
        pytest.skip("no AMX int8 tiles in this build or on this CPU")
    try:
        results = {}
        for on in (True, False):
            ops.set_amx(on)
            results[on] = [(r.token_ids, r.log_probs) for r in llm.generate(prompts, params, progress=False)]
    finally:
        ops.set_amx(before)
    assert results[True] == results[False]

