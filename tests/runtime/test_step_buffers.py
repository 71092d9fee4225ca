"""A step's buffers (runtime/step.py) hold each chunk's tokens, positions, slots, lengths and block table, for any
mix of prompt chunks and decode rows, in the eager layout and in the C++ step's bound one; they grow when a step needs
more; and the C entry point reports a bad step or a stale decoder as an error."""

from __future__ import annotations

import ctypes
import random

import pytest

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.executor import CpuStepExecutor
from llmengine_runtime.runtime.step import Chunk, StepBuffers
from tests.models.tiny import save_tiny


def random_chunks(rng: random.Random, n: int, block_size: int, max_blocks: int, decode: bool) -> list[Chunk]:
    chunks = []
    for _ in range(n):
        blocks = rng.randint(1, max_blocks)
        table = rng.sample(range(1000), blocks)
        end = rng.randrange((blocks - 1) * block_size, blocks * block_size) + 1  # its last token in its last block
        length = 1 if decode else rng.randint(1, end)
        tokens = [rng.randrange(500) for _ in range(length)]
        chunks.append(Chunk(tokens, end - length, table, rng.randint(0, length)))
    return chunks


def expected(chunks: list[Chunk], block_size: int):
    """The step's inputs, spelled out token by token."""
    ids, positions, slots, lens, cu, logit_index = [], [], [], [], [0], []
    for chunk in chunks:
        for j, token in enumerate(chunk.token_ids):
            p = chunk.start + j
            ids.append(token)
            positions.append(p)
            slots.append(chunk.block_table[p // block_size] * block_size + p % block_size)
        lens.append(chunk.start + len(chunk.token_ids))
        cu.append(cu[-1] + len(chunk.token_ids))
        logit_index += range(cu[-1] - chunk.num_logits, cu[-1])
    return ids, positions, slots, lens, cu, logit_index


@pytest.mark.parametrize("decode", [True, False])
def test_fill_writes_every_chunk_and_grows(decode):
    rng = random.Random(0)
    block_size = 16
    buffers = StepBuffers(vocab_size=7, tokens=2, seqs=2, width=3)
    for n, max_blocks in [(1, 2), (2, 3), (5, 3), (3, 9), (1, 1), (4, 2)]:  # more rows, a wider table, fewer
        chunks = random_chunks(rng, n, block_size, max_blocks, decode)
        for bound in (False, True):
            seqs, width = buffers.block_tables.shape
            tokens, version = buffers.input_ids.numel(), buffers.version
            assert buffers.fill(chunks, block_size, bound=bound) == n == buffers.rows
            num_tokens = sum(len(c.token_ids) for c in chunks)
            longest = max(len(c.block_table) for c in chunks)
            assert (buffers.version != version) == (n > seqs or longest > width or num_tokens > tokens)
            ids, positions, slots, lens, cu, logit_index = expected(chunks, block_size)
            input_ids, pos, meta = buffers.inputs()
            if not bound:
                assert input_ids.tolist() == ids and pos.tolist() == positions
                assert meta.slot_mapping.tolist() == slots and meta.seq_lens.tolist() == lens
                assert meta.cu_seqlens_q.tolist() == cu and meta.max_seqlen_q == max(len(c.token_ids) for c in chunks)
                assert meta.is_decode == decode and buffers.logit_index == logit_index
                assert meta.block_tables.shape == (n, max(2, longest)) and meta.block_tables.is_contiguous()
                tables = meta.block_tables
            else:  # the C++ step's layout: the whole buffers, tables `capacity_width` wide
                bound_ids, bound_pos, bound_slots, tables, bound_lens, bound_cu, bound_rows = buffers.tensors()
                assert tables.shape[1] == buffers.capacity_width
                t, r = len(ids), len(logit_index)
                assert bound_ids[:t].tolist() == ids and bound_slots[:t].tolist() == slots
                assert bound_pos[:t].tolist() == positions and bound_lens[:n].tolist() == lens
                assert bound_cu[:n + 1].tolist() == cu and bound_rows[:r].tolist() == logit_index
                assert buffers.step_logits().shape == (r, 7) and len(buffers.step_argmax()) == r
            for i, chunk in enumerate(chunks):  # entries past a sequence's blocks are never read
                assert tables[i, :len(chunk.block_table)].tolist() == chunk.block_table


def test_bound_tensors_fit_what_the_decoder_checks():
    """What LlamaDecoder.bind_buffers checks: one entry per token, per sequence (and one more query offset), per
    logits row; contiguous."""
    buffers = StepBuffers(vocab_size=5, tokens=3, seqs=6, width=4, logit_rows=2)
    (ids, positions, slots, tables, lens, cu, rows), (logits, tokens) = buffers.tensors(), buffers.outputs()
    assert ids.numel() == positions.numel() == slots.numel() >= 6  # at least a token per sequence
    assert tables.shape == (6, 4) and lens.numel() == 6 and cu.numel() == 7
    assert rows.numel() == logits.shape[0] == tokens.numel() == 2 and logits.shape[1] == 5
    assert all(t.is_contiguous() for t in (ids, positions, slots, tables, lens, cu, rows, logits, tokens))


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = save_tiny("llama-gqa-tied-bias", tmp_path_factory.mktemp("tiny"))
    llm = LLM(path, quantize="int8", block_size=16, cpu_threads=2)
    llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0), progress=False)  # binds
    return llm


def test_a_failing_step_raises_its_message(tiny_llm):
    runner = tiny_llm.engine.runner
    assert isinstance(runner.executor, CpuStepExecutor)
    fused, buffers = runner.executor.fused, runner.executor.head_buffers
    assert fused.bound_buffers is buffers
    buffers.fill([Chunk([3], 0, [1], 1)], runner.block_size, bound=True)
    buffers.input_ids[0] = tiny_llm.engine.config.vocab_size + 5
    with pytest.raises(RuntimeError, match="is not in the vocabulary"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    buffers.fill([Chunk([3], 0, [10 ** 6], 1)], runner.block_size, bound=True)
    with pytest.raises(RuntimeError, match="slot 16000000 past the cache"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    # its own slot is in block 1; block 0 is not
    buffers.fill([Chunk([3], 16, [10 ** 6, 1], 1)], runner.block_size, bound=True)
    with pytest.raises(RuntimeError, match="block 1000000 is not in the cache"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    buffers.fill([Chunk([3, 4], 0, [1], 1)], runner.block_size, bound=True)  # a 2-token chunk ...
    buffers.seq_lens[0] = 1  # ... of a 1-token sequence
    with pytest.raises(RuntimeError, match="has 2 new tokens and 1 in all"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    # and the engine goes on serving
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0), progress=False)
    assert len(out[0].token_ids) == 3


def test_a_stale_decoder_number_is_an_error():
    error = ctypes.create_string_buffer(256)
    assert cpu_kernels.step_function()(2 ** 40, 1, 1, 1, 1, error, len(error)) == 1
    assert b"no live decoder" in error.value


@pytest.mark.slow  # two engines
def test_more_rows_than_the_buffers_had(tmp_path, monkeypatch):
    """A batch of 11 (the buffers start with 8 rows) decodes as the eager path does."""
    path = save_tiny("llama-gqa-tied-bias", tmp_path / "tiny")
    prompts = [[5 + i, 17, 99, 3 + i] * (1 + i % 3) for i in range(11)]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("LLMENGINE_FUSED_DECODE", fused)
        llm = LLM(path, quantize="int4", block_size=16, cpu_threads=2)
        results[fused] = [(r.token_ids, r.log_probs) for r in llm.generate(prompts, params, progress=False)]
        if fused == "1":
            assert llm.engine.runner.executor.head_buffers.block_tables.shape[0] >= 11
    assert results["1"] == results["0"]
