"""The fused decode step's buffers (runtime/decode_buffers.py) hold what `ModelRunner.prepare` builds for a decode
batch, grow when a batch needs more, and the C entry point reports a bad step or a stale decoder as an error."""

from __future__ import annotations

import ctypes
import random
from types import SimpleNamespace

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.fused_decode import FusedDecode
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.decode_buffers import DecodeBuffers
from llmengine_runtime.runtime.model_runner import Chunk, ModelRunner
from tests.models.tiny import save_tiny


def decode_chunks(rng: random.Random, n: int, block_size: int, max_blocks: int) -> list[Chunk]:
    chunks = []
    for _ in range(n):
        blocks = rng.randint(1, max_blocks)
        table = rng.sample(range(1000), blocks)
        position = rng.randrange((blocks - 1) * block_size, blocks * block_size)  # in its last block
        chunks.append(Chunk([rng.randrange(500)], position, table, 1))
    return chunks


def test_fill_matches_prepare_and_grows():
    rng = random.Random(0)
    block_size = 16
    runner = SimpleNamespace(block_size=block_size, device=torch.device("cpu"))
    buffers = DecodeBuffers(vocab_size=7, rows=2, width=3)
    for n, max_blocks in [(1, 2), (2, 3), (5, 3), (3, 9), (1, 1)]:  # more rows, then a wider table, then fewer
        rows, width, version = *buffers.block_tables.shape, buffers.version
        chunks = decode_chunks(rng, n, block_size, max_blocks)
        assert buffers.fill(chunks, block_size) == n == buffers.rows
        needs_more = n > rows or max(len(chunk.block_table) for chunk in chunks) > width
        assert (buffers.version != version) == needs_more
        input_ids, positions, meta, _ = ModelRunner.prepare(runner, chunks)
        assert torch.equal(buffers.input_ids[:n], input_ids) and torch.equal(buffers.positions[:n], positions)
        assert torch.equal(buffers.slot_mapping[:n], meta.slot_mapping)
        assert torch.equal(buffers.seq_lens[:n], meta.seq_lens)
        for i, chunk in enumerate(chunks):  # entries past a sequence's blocks are never read
            blocks = len(chunk.block_table)
            assert torch.equal(buffers.block_tables[i, :blocks], meta.block_tables[i, :blocks])
        assert buffers.step_logits().shape == (n, 7) and len(buffers.step_argmax()) == n


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = save_tiny("llama-gqa-tied-bias", tmp_path_factory.mktemp("tiny"))
    llm = LLM(path, quantize="int8", block_size=16, cpu_threads=2)
    llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0), progress=False)  # binds
    return llm


def test_a_failing_step_raises_its_message(tiny_llm):
    runner = tiny_llm.engine.runner
    fused = tiny_llm.engine.model.fused_decode
    assert isinstance(fused, FusedDecode) and fused.bound_buffers is runner.decode_buffers
    buffers = runner.decode_buffers
    buffers.fill([Chunk([3], 0, [1], 1)], runner.block_size)
    buffers.input_ids[0] = tiny_llm.engine.config.vocab_size + 5
    with pytest.raises(RuntimeError, match="is not in the vocabulary"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    buffers.fill([Chunk([3], 0, [10 ** 6], 1)], runner.block_size)
    with pytest.raises(RuntimeError, match="slot 16000000 past the cache"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    buffers.fill([Chunk([3], 16, [10 ** 6, 1], 1)], runner.block_size)  # its own slot is in block 1; block 0 is not
    with pytest.raises(RuntimeError, match="block 1000000 is not in the cache"):
        fused.step_buffers(buffers, runner.kv_caches, argmax=True)
    # and the engine goes on serving
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0), progress=False)
    assert len(out[0].token_ids) == 3


def test_a_stale_decoder_number_is_an_error():
    error = ctypes.create_string_buffer(256)
    assert cpu_kernels.decode_step_function()(2 ** 40, 1, 1, error, len(error)) == 1
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
            assert llm.engine.runner.decode_buffers.block_tables.shape[0] >= 11
    assert results["1"] == results["0"]
