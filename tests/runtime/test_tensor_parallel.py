"""Tensor parallelism on CPU (gloo, 2 ranks) gives what one rank gives: fp32 logits within 1e-5 and identical
greedy tokens for every model variant, through chunked prefill and preemption; and each rank reads only its slices.

Spawning a worker takes seconds here, so each variant starts one engine pair and runs every check through it.
"""

from __future__ import annotations

import os

import pytest
import torch

from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import load_config, parse_config
from llmengine_runtime.models.loader import load_weights
from llmengine_runtime.models.parallel import TensorParallel
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.step import Chunk
from tests.models.tiny import LLAMA_BASE

BLOCK = 4
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [30, 31, 32], list(range(40, 51))]


def load_config_dict(**overrides):
    return parse_config(dict(LLAMA_BASE, architectures=["LlamaForCausalLM"], **overrides))


def engine_kwargs(folder, cache_gib) -> dict:
    """Small on purpose: 8-token steps chunk every longer prompt, and 14 blocks of 4 preempt four sequences."""
    return dict(device="cpu", block_size=BLOCK, kv_cache_gib=cache_gib(folder, 14, BLOCK), max_num_batched_tokens=8,
                max_num_seqs=4, enable_prefix_caching=False)


def logits_of(llm: LLM) -> torch.Tensor:
    """All-position logits of two prompts (one over several blocks), then one decode step of each."""
    runner = llm.engine.runner
    prefill = [Chunk([3, 1, 4, 1, 5, 9, 2, 6, 5], 0, [0, 1, 2], 9), Chunk([2, 7, 1, 8], 0, [3], 4)]
    decode = [Chunk([8], 9, [0, 1, 2], 1), Chunk([2], 4, [3, 4], 1)]
    first = runner.run(prefill).clone()  # (the C++ step's logits live in its buffer until the next step)
    return torch.cat([first, runner.run(decode)])


def generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    return [r.token_ids for r in llm.generate(PROMPTS, params, progress=False)]


def check_variant(folder, cache_gib, world_size: int = 2) -> None:
    one = LLM(folder, **engine_kwargs(folder, cache_gib))
    expected_logits, expected_tokens = logits_of(one), generate(one)
    assert one.engine.scheduler.num_preemptions > 0  # the small cache does preempt
    with LLM(folder, tensor_parallel_size=world_size, **engine_kwargs(folder, cache_gib)) as tp:
        torch.testing.assert_close(logits_of(tp), expected_logits, atol=1e-5, rtol=0)
        assert generate(tp) == expected_tokens
        assert tp.engine.scheduler.num_preemptions == one.engine.scheduler.num_preemptions
        pids = tp.engine.workers.pids
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # close() stopped every worker


@pytest.mark.slow  # spawns a worker process (seconds)
def test_gqa_tied_head_with_biases(tiny_dir, cache_gib):
    """GQA (2 KV heads split over 2 ranks), a tied head, q/k/v/o biases (o_proj's added once)."""
    check_variant(tiny_dir("llama-gqa-tied-bias"), cache_gib)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama-mha", "llama-mqa-linear", "falcon-7b-like", "falcon-40b-like",
                                     "falcon-11b-like", "falcon-rw-like"])
def test_variants(tiny_dir, cache_gib, variant):
    """MHA; MQA with its one KV head replicated (Llama, Falcon's multi-query layout); Falcon's grouped new
    architecture (whole groups per rank), its one-norm form, and MHA with ALiBi (each rank its heads' slopes)."""
    check_variant(tiny_dir(variant), cache_gib)


@pytest.mark.slow
def test_uneven_groups_and_mlp_rows(tmp_path, cache_gib):
    """3 KV groups of 2 heads and an MLP of 97 rows on 2 ranks: 1 group and 48 rows on rank 0, 2 groups and 49 rows
    on rank 1 (as SmolLM2-135M's 3 groups split)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(LLAMA_BASE, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                             intermediate_size=97))
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    check_variant(tmp_path, cache_gib)


@pytest.mark.slow
def test_four_ranks_replicate_grouped_kv_heads(tiny_dir, cache_gib):
    """8 query heads in 2 KV groups over 4 ranks: each KV head on 2 ranks, each rank 2 query heads of its group."""
    check_variant(tiny_dir("falcon-40b-like"), cache_gib, world_size=4)


@pytest.mark.slow
def test_int4_shards_quantize_like_one_rank(tiny_dir):
    """int4 groups of 32 quantized per rank after slicing are the groups one rank makes: the same weights, so
    logits agree to the bf16 rounding of the partial products."""
    folder = tiny_dir("falcon-40b-like")
    kwargs = dict(device="cpu", block_size=BLOCK, kv_cache_gib=0.01, quantize="int4", quant_group_size=32)
    expected = logits_of(LLM(folder, **kwargs))
    with LLM(folder, tensor_parallel_size=2, **kwargs) as tp:
        torch.testing.assert_close(logits_of(tp), expected, atol=0.05, rtol=0.02)


def test_quantization_groups_must_fit_the_shards(tiny_dir):
    """llama-mha's down_proj has 96 inputs, 48 per rank: groups of 32 would straddle ranks, refused before spawning."""
    with pytest.raises(ValueError, match="rank 0 holds 48 of its 96 inputs"):
        LLM(tiny_dir("llama-mha"), device="cpu", kv_cache_gib=0.01, quantize="int4", quant_group_size=32,
            tensor_parallel_size=2)


def test_sizes_that_do_not_split_are_refused(tiny_dir):
    """One KV head over 3 ranks: 4 query heads do not split into 3 equal shares of the replicated group."""
    with pytest.raises(ValueError, match="cannot split 4 attention heads in 1 KV groups"):
        LLM(tiny_dir("llama-mqa-linear"), device="cpu", kv_cache_gib=0.01, tensor_parallel_size=3)


def test_uneven_whole_groups():
    """SmolLM2-135M: 9 heads in 3 KV groups, MLP 1536, on 2 ranks: 1 group and 2 groups, 768 MLP rows each."""
    config = load_config_dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=1536)
    shards = [TensorParallel(rank, 2).shard_config(config) for rank in range(2)]
    assert [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shards] == [(3, 1, 768), (6, 2, 768)]
    assert [TensorParallel(rank, 2).heads(config) for rank in range(2)] == [(0, 3), (3, 9)]


def shard_bytes(folder, rank: int, world_size: int) -> tuple[CausalLM, dict[str, int]]:
    config = load_config(folder)
    with torch.device("meta"):
        model = CausalLM(config, None if world_size == 1 else TensorParallel(rank, world_size))
    model = model.to_empty(device="cpu")
    model.init_buffers()
    with torch.no_grad():
        return model, load_weights(model, folder, progress=False)


def layer_bytes(read: dict[str, int]) -> int:
    """The projections' bytes (the norms, replicated, are a few hundred bytes per layer)."""
    return sum(n for name, n in read.items() if (".layers." in name or ".h." in name)
               and "norm" not in name and ".ln_" not in name)


@pytest.mark.parametrize("variant, share", [("llama-mha", 0.5), ("falcon-40b-like", 0.5), ("falcon-7b-like", 0.55)])
def test_each_rank_reads_only_its_slices(tiny_dir, variant, share):
    """Bytes read per rank: half the projections' weights (Falcon-7b's one KV head, replicated, a little more), and the
    shards put together are the whole model's projections."""
    folder = tiny_dir(variant)
    whole, read = shard_bytes(folder, 0, 1)
    shards = [shard_bytes(folder, rank, 2) for rank in range(2)]
    for _, shard_read in shards:
        assert layer_bytes(shard_read) <= share * layer_bytes(read)
    (rank0, _), (rank1, _) = shards
    for a, b, full in zip(rank0.layers, rank1.layers, whole.layers):
        torch.testing.assert_close(torch.cat([a.attn.o_proj.weight, b.attn.o_proj.weight], 1), full.attn.o_proj.weight)
        torch.testing.assert_close(torch.cat([a.mlp.down_proj.weight, b.mlp.down_proj.weight], 1),
                                   full.mlp.down_proj.weight)
        q = full.attn.q_size // 2
        torch.testing.assert_close(torch.cat([a.attn.qkv_proj.weight[:q], b.attn.qkv_proj.weight[:q]]),
                                   full.attn.qkv_proj.weight[:2 * q])


@pytest.mark.slow
def test_ngram_speculation_on_two_ranks(tiny_dir):
    """Proposals verified in one forward of 1 + k rows per sequence run on every rank alike."""
    folder = tiny_dir("llama-mha")
    kwargs = dict(device="cpu", kv_cache_gib=0.01, speculative="ngram")
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [10, 11, 12]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [r.token_ids for r in LLM(folder, **kwargs).generate(prompts, params, progress=False)]
    with LLM(folder, tensor_parallel_size=2, **kwargs) as tp:
        assert [r.token_ids for r in tp.generate(prompts, params, progress=False)] == expected
        assert tp.engine.stats()["spec_accepted_tokens"] > 0


def test_gguf_integers_are_refused_before_spawning(tiny_dir):
    with pytest.raises(ValueError, match="not a GGUF's integers"):
        LLM(tiny_dir("llama-mha"), device="cpu", kv_cache_gib=0.01, quantize="gguf", tensor_parallel_size=2)
