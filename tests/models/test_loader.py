"""Loading checkpoints: sharded equals single file, dtypes, and every bad input gets a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmengine_runtime.models.config import ConfigError, load_config
from llmengine_runtime.models.loader import WeightsError, load_model
from llmengine_runtime.models.zoo import ModelNotFoundError, resolve_model
from tests.models.tiny import make_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf_model("llama-gqa-tied-bias").save_pretrained(path, safe_serialization=True)
    return path


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_sharded_checkpoint_loads_identically(tiny_dir, tmp_path):
    make_hf_model("llama-gqa-tied-bias").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    single = state(load_model(tiny_dir, progress=False, pack=False))
    sharded = state(load_model(tmp_path, progress=False, pack=False))
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(single[name], sharded[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_to_dtype(tiny_dir, dtype, monkeypatch):
    monkeypatch.setenv("LLMENGINE_FLOAT_WEIGHTS", "0")  # the whole model in `dtype` (test_float_linear: the default)
    model = load_model(tiny_dir, dtype=dtype, progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = load_model(tiny_dir, progress=False)
    assert torch.equal(model.embed.weight, ref.embed.weight.to(dtype))


def copy_checkpoint(src, dst, edit=None, config_edit=None):
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    copy_checkpoint(tiny_dir, tmp_path, edit=lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=f"missing tensors.*{name}"):
        load_model(tmp_path, progress=False)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    copy_checkpoint(tiny_dir, tmp_path, edit=lambda t: t.__setitem__(name, t[name][:-1].contiguous()))
    with pytest.raises(WeightsError, match=rf"{name}.*shape \(95, 64\), expected \(96, 64\)"):
        load_model(tmp_path, progress=False)


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    copy_checkpoint(tiny_dir, tmp_path, edit=lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match="unexpected tensors.*model.extra.weight"):
        load_model(tmp_path, progress=False)


def test_unsupported_architecture(tiny_dir, tmp_path):
    copy_checkpoint(tiny_dir, tmp_path, config_edit=lambda c: c.update(architectures=["GPT2LMHeadModel"],
                                                                       model_type="gpt2"))
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path, progress=False)


def test_unsupported_rope_scaling(tiny_dir, tmp_path):
    copy_checkpoint(tiny_dir, tmp_path, config_edit=lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4}))
    with pytest.raises(ConfigError, match="unsupported rope scaling type 'yarn'"):
        load_config(tmp_path)


def test_no_safetensors(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="no \\*.safetensors.*pytorch_model.bin"):
        load_model(tmp_path, progress=False)


def test_unknown_model_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=f"no-such-model.*{tmp_path}"):
        resolve_model("no-such-model")


def test_zoo_name_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="llama-2-7b.*models--meta-llama--Llama-2-7b-hf.*--model llama-2-7b="):
        resolve_model("llama-2-7b")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_packed_cpu_weights_give_the_same_logits(tiny_dir, dtype, tolerance, monkeypatch):
    import gc

    monkeypatch.setenv("LLMENGINE_FLOAT_WEIGHTS", "0")  # bf16 weights in oneDNN's layout, not ours (float_linear)
    from llmengine_runtime.models.attention import AttentionMetadata
    from llmengine_runtime.models.packed_linear import PACKED, can_pack

    if not can_pack(dtype):  # oneDNN's bf16 path needs AVX-512 (or AVX-NE-CONVERT); dense weights are used then
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    before = len(PACKED)
    packed = load_model(tiny_dir, dtype=dtype, progress=False)
    assert packed.layers[0].attn.qkv_proj.packed_index is not None and packed.head_packed_index is not None
    assert packed.layers[0].attn.qkv_proj.weight.is_meta  # the dense copy is gone
    plain = load_model(tiny_dir, dtype=dtype, progress=False, pack=False)
    assert plain.layers[0].attn.qkv_proj.packed_index is None
    ids = torch.tensor([5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 13, 17, 19, 23, 29, 31, 37, 40])
    for n in (1, 4, len(ids)):  # rows of a decode step, a small batch, a prompt
        meta = AttentionMetadata.for_prompts([n])
        with torch.no_grad():
            got = packed.compute_logits(packed(ids[:n], torch.arange(n), meta)).float()
            expected = plain.compute_logits(plain(ids[:n], torch.arange(n), meta)).float()
        # oneDNN accumulates in another order: fp32 agrees to rounding; bf16 rounding differs more, and a
        # random tiny model has near-ties, so compare values, not argmax (real-model text: benchmarks/RESULTS.md)
        assert (got - expected).abs().max() < tolerance * expected.abs().max()
    assert len(PACKED) > before
    del packed
    gc.collect()
    assert len(PACKED) == before  # a freed model's packed weights leave the table
