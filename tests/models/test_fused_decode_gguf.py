"""The one-call C++ step (models/fused_decode.py) takes GGUF layers (models/gguf_linear.py): projections of any
type the C++ product takes, fused projections whose parts differ in type, a GGUF head and a GGUF embedding table.
Tiny Llama GGUFs written with gguf-py (tests/models/test_gguf_mixed.py's writer): greedy generation with chunked
prefill and with n-gram speculation gives the eager path's tokens and log-probs bit for bit, on 1 and 2 threads,
and the step's table lookup is gguf-py's dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.fused_decode import FusedDecode
from llmengine_runtime.models.gguf_linear import GGUFEmbedding, GGUFLinear, GGUFRowParts
from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.executor import CpuStepExecutor
from tests.fast import fast_subset
from tests.models.test_gguf_mixed import write_mixed_gguf
from tests.models.test_gguf_types import QUANTIZED, random_rows

Q = GGMLQuantizationType
pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ kernels are not built")

LAYERS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def every_layer(types: dict[str, Q]) -> dict[str, Q]:
    return {f"blk.{i}.{part}": qtype for i in (0, 1) for part, qtype in types.items()}


# name -> (table type, tied, head type, per-tensor types): every projection on a kernel the step takes
FILES = {
    # llama-quantize's Q4_K_M: Q4_K with Q6_K v / down, a Q6_K tied table; layer 1 has the other types
    "Q4_K_M-like": (Q.Q6_K, True, None, every_layer({"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K,
                                                      "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K,
                                                      "ffn_down": Q.Q6_K})
                    | {"blk.1.attn_q": Q.Q5_0, "blk.1.attn_k": Q.Q5_0, "blk.1.attn_v": Q.Q8_0,
                       "blk.1.attn_output": Q.Q5_1, "blk.1.ffn_gate": Q.Q2_K, "blk.1.ffn_up": Q.Q3_K,
                       "blk.1.ffn_down": Q.Q5_K}),
    # llama.cpp's Q4_0 files: Q4_0 projections (our int4 kernels) and a Q6_K table, tied
    "Q4_0": (Q.Q6_K, True, None, every_layer({part: Q.Q4_0 for part in LAYERS})),
    # a Q4_K table with its own Q6_K head; Q8_0 down (int8 QuantizedLinear) beside GGUF layers
    "Q4_K-table-Q6_K-head": (Q.Q4_K, False, Q.Q6_K, every_layer({"attn_q": Q.Q4_K, "attn_k": Q.Q4_K,
                                                                 "attn_v": Q.Q4_K, "attn_output": Q.Q4_1,
                                                                 "ffn_gate": Q.Q5_K, "ffn_up": Q.Q5_K,
                                                                 "ffn_down": Q.Q8_0})),
}
PROMPTS = [[5, 17, 99, 3, 64, 8, 21, 5, 17, 99, 3, 64, 8], [7, 100, 2, 45] * 5, [9] * 40]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    class Files(dict):  # written on first use
        def __missing__(self, name):
            table, tied, head, overrides = FILES[name]
            path = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
            write_mixed_gguf(path, table, tied, head, overrides)
            self[name] = path
            return path
    return Files()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))


def generate(path, fused: bool, threads: int, speculative: str | None, monkeypatch):
    monkeypatch.setenv("LLMENGINE_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(path, device="cpu", quantize="gguf", block_size=16, cpu_threads=threads, kv_cache_gib=0.01,
              max_num_batched_tokens=5 if speculative is None else 2048, speculative=speculative,
              enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    results = [(r.token_ids, r.log_probs) for r in llm.generate(PROMPTS, params, progress=False)]
    return results, llm


CASES = [(name, threads, spec) for name in FILES for threads in (1, 2) for spec in (None, "ngram")]


@pytest.mark.parametrize("name, threads, speculative",
                         fast_subset(CASES, [("Q4_K_M-like", 2, None), ("Q4_0", 1, "ngram"),
                                             ("Q4_K-table-Q6_K-head", 2, "ngram")]))
def test_gguf_step_matches_eager(gguf_files, models_dir, name, threads, speculative, monkeypatch):
    before = torch.get_num_threads()
    shapes = []
    calls = FusedDecode.step_buffers

    def recording(self, buffers, kv_caches, argmax):
        shapes.append((buffers.rows, buffers.num_tokens))
        calls(self, buffers, kv_caches, argmax)

    monkeypatch.setattr(FusedDecode, "step_buffers", recording)
    try:
        fused, llm = generate(gguf_files[name], True, threads, speculative, monkeypatch)
        executor = llm.engine.runner.executor
        assert isinstance(executor, CpuStepExecutor) and executor.fused.has_head  # the C++ step, head included
        model = llm.engine.model
        assert isinstance(model.embed, GGUFEmbedding) and model.embed.ggml_type == FILES[name][0]
        kinds = {type(m) for m in model.modules()}
        assert GGUFLinear in kinds  # (the head at least)
        if name == "Q4_K_M-like":
            assert GGUFRowParts in kinds and QuantizedLinear not in kinds
        if name == "Q4_0":
            assert QuantizedLinear in kinds and isinstance(model.quantized_head, GGUFLinear)
        eager, llm_eager = generate(gguf_files[name], False, threads, speculative, monkeypatch)
        assert not isinstance(llm_eager.engine.runner.executor, CpuStepExecutor)
    finally:
        torch.set_num_threads(before)
    assert fused == eager  # tokens and log-probs, bit for bit
    assert any(tokens > seqs for seqs, tokens in shapes)  # prompt chunks or verification rows in one C++ step
    if speculative:
        assert llm.engine.stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("qtype", QUANTIZED, ids=[q.name for q in QUANTIZED])
def test_gguf_row_lookup_is_gguf_py_dequantize(qtype):
    """The step's table lookup (gguf_dequant.cpp, the `gguf_embedding_rows` op) on random valid bytes (subnormal
    and negative scales included), rows in any order and repeated, ragged row counts, rows of 1 to 4 K-blocks."""
    rng = np.random.default_rng(int(qtype))
    for n, k in [(1, 256), (5, 512), (17, 1024)]:
        raw = random_rows(qtype, n, k, rng)
        expected = torch.from_numpy(dequantize(raw, qtype).reshape(n, k).astype(np.float32))
        ids = torch.from_numpy(rng.integers(0, n, 2 * n + 1))
        got = torch.ops.llmengine_cpu.gguf_embedding_rows(torch.from_numpy(raw), int(qtype), k, ids)
        assert torch.equal(got, expected[ids])


def test_the_step_declines_a_table_the_product_does_not_take(gguf_files, models_dir, monkeypatch):
    """A GGUF layer the C++ product does not run (moved to its dequantized path) keeps the eager step."""
    llm = LLM(gguf_files["Q4_K_M-like"], device="cpu", quantize="gguf", kv_cache_gib=0.01)
    model = llm.engine.model
    assert FusedDecode.build(model) is not None
    layer = model.layers[0].mlp.down_proj
    layer.chosen = (layer.raw.device, "dequantized")
    assert FusedDecode.build(model) is None
