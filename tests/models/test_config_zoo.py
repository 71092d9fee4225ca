"""Config parsing (incl. legacy Falcon names) and the model zoo's lookup paths."""

from __future__ import annotations

import pytest

from llmengine_runtime.models.config import parse_config
from llmengine_runtime.models.zoo import ZOO, list_models, resolve_model
from tests.models.tiny import make_hf_model


def test_legacy_falcon_7b_names():
    c = parse_config({"model_type": "RefinedWebModel", "architectures": ["RWForCausalLM"], "vocab_size": 65024,
                      "hidden_size": 4544, "n_head": 71, "n_layer": 32, "multi_query": True,
                      "parallel_attn": True, "bias": False, "alibi": False})
    assert (c.arch, c.num_heads, c.num_kv_heads, c.num_layers, c.head_dim) == ("falcon", 71, 1, 32, 64)
    assert c.parallel_attn and not c.new_decoder_architecture and c.use_rope


def test_legacy_falcon_40b_names():
    c = parse_config({"model_type": "RefinedWeb", "vocab_size": 65024, "hidden_size": 8192, "n_head": 128,
                      "n_head_kv": 8, "n_layer": 60, "parallel_attn": True, "bias": False, "alibi": False})
    assert c.new_decoder_architecture and c.num_kv_heads == 8 and c.num_ln_in_parallel_attn == 2


def test_rope_parameters_key():
    c = parse_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0}})
    assert c.rope_theta == 5000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_configs_parse_at_real_shapes(name):
    c = parse_config(ZOO[name].config)
    assert c.num_heads * c.head_dim == c.hidden_size
    if name == "falcon-7b":
        assert (c.num_heads, c.num_kv_heads, c.hidden_size) == (71, 1, 4544)
    if name == "llama-2-70b":
        assert (c.num_kv_heads, c.num_layers) == (8, 80)


@pytest.mark.slow  # saves a transformers model four times
def test_lookup_by_env_dir_mapping_and_hf_cache(tmp_path, monkeypatch):
    hf = make_hf_model("llama-mha")
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("LLMENGINE_MODEL_PATHS", raising=False)
    hf.save_pretrained(tmp_path / "models" / "llama-7b")
    assert resolve_model("llama-7b") == tmp_path / "models" / "llama-7b"
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    hf.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert resolve_model("llama-2-7b") == snapshot
    hf.save_pretrained(tmp_path / "mine")
    assert resolve_model("falcon-7b", {"falcon-7b": tmp_path / "mine"}) == tmp_path / "mine"
    monkeypatch.setenv("LLMENGINE_MODEL_PATHS", f"my-model={tmp_path / 'mine'}")
    assert resolve_model("my-model") == tmp_path / "mine"
    available = dict(list_models())
    assert available["llama-7b"] and available["llama-2-7b"] and available["my-model"]
    assert available["llama-2-13b"] is None
