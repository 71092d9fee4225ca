"""GGUF files of the Qwen2, Qwen3 and Mistral families (models/gguf.py, models/families.py's GGUFNames): a tiny
random transformers checkpoint written as llama.cpp would write it (gguf-py's GGUFWriter; `general.architecture`
qwen2 / qwen3 with HF's q/k row order, Qwen2's q/k/v biases and Qwen3's per-head norms as their llama.cpp tensors;
Mistral as a "llama" file with q/k rows permuted and `llama.attention.sliding_window`) loads, converted to a folder
or served from the GGUF itself, to the family's config and to transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.gguf import TOP_NAMES, convert_gguf, layer_names
from llmengine_runtime.models.gguf_model import gguf_model_folder
from llmengine_runtime.models.loader import load_model
from tests.models.test_families import make_hf_model, random_prompts
from tests.models.test_gguf import gpt2_vocab, llamacpp_permute

CASES = {"qwen2": "qwen2", "qwen3-bias": "qwen3", "mistral-window16": "llama"}  # family case -> GGUF architecture


def digit_vocab():
    """test_gguf's byte-level vocabulary plus merges of digits ("12", "123", "00", "000"): cut as one word,
    "12345" would take them; cut a digit at a time (Qwen's pre-tokenizer) it cannot."""
    tokens, types, merges, scores = gpt2_vocab()
    for merged, merge in [("12", "1 2"), ("123", "12 3"), ("00", "0 0"), ("000", "00 0")]:
        tokens, types, merges = tokens + [merged], types + [1], merges + [merge]
    return tokens, types, merges, scores


def gguf_tensor_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{ {v: k for k, v in layer_names().items()}[part]}.{kind}"
    part, kind = hf.rsplit(".", 1)
    return f"{ {v: k for k, v in TOP_NAMES.items()}[part]}.{kind}"


def write_gguf(path, hf, arch: str) -> None:
    c = hf.config
    tokens, types, merges, _ = digit_vocab()
    w = GGUFWriter(path, arch)
    w.add_name("Mistral-tiny" if arch == "llama" else f"{arch}-tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "default")  # as llama.cpp writes Qwen vocabularies
    w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:  # llama.cpp's converter permutes llama files' q/k rows only
            array = llamacpp_permute(array, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llamacpp_permute(array, c.num_key_value_heads)
        w.add_tensor(gguf_tensor_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tmp_path_factory):
    name = request.param
    hf = make_hf_model(name, vocab_size=len(digit_vocab()[0]))
    folder = tmp_path_factory.mktemp(name)
    write_gguf(folder / "tiny.gguf", hf, CASES[name])
    return name, hf, folder


def check_logits(ours, hf) -> None:
    prompts = random_prompts([40, 7], seed=5)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, positions, AttentionMetadata.for_prompts([len(p) for p in prompts])))
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    assert (got - expected).abs().max().item() < 1e-4


def test_converted_folder_matches_transformers(written):
    name, hf, folder = written
    ours = load_model(convert_gguf(folder / "tiny.gguf", folder / "converted", progress=False), progress=False)
    assert ours.config.arch == name.split("-")[0]
    windows = [ours.config.window(i) for i in range(ours.config.num_layers)]
    assert windows == ([16] * hf.config.num_hidden_layers if name == "mistral-window16" else [0, 0])
    assert ours.config.qk_norm == (name == "qwen3-bias")
    assert (ours.config.attention_bias, ours.config.attention_out_bias) == {
        "qwen2": (True, False), "qwen3-bias": (True, True), "mistral-window16": (False, False)}[name]
    check_logits(ours, hf)


def test_served_from_the_gguf_matches_transformers(written, tmp_path):
    """The GGUF read directly (models/gguf_model.py: no safetensors), its F32 tensors as they are."""
    _, hf, folder = written
    model_folder = gguf_model_folder(folder / "tiny.gguf", tmp_path)
    check_logits(load_model(model_folder, progress=False), hf)


def test_llama_rows_left_permuted_would_show(written):
    """The q/k row order matters here: a qwen file un-permuted as a llama file (or a llama file left permuted)
    gives other logits, so the tests above tell the orders apart."""
    name, hf, folder = written
    permuted = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    swapped = torch.from_numpy(llamacpp_permute(permuted.numpy(), hf.config.num_attention_heads))
    assert not torch.equal(permuted, swapped)


def test_qwen_tokenizer_equals_transformers(written):
    """A Qwen GGUF's `tokenizer.ggml.pre` "qwen2" cuts every digit alone (llama3's cut takes up to three), as
    transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    from llmengine_runtime.models.tokenizer import Tokenizer

    name, _, folder = written
    if not name.startswith("qwen"):
        pytest.skip("a llama vocabulary (tests/models/test_gguf.py)")
    ours = Tokenizer.from_folder(gguf_model_folder(folder / "tiny.gguf", folder / "served"))
    ref = AutoTokenizer.from_pretrained(folder, gguf_file="tiny.gguf")
    for text in ["hello world 12345", "the code is in 2024-06-01, x=1000000", "  return  x\n\tdef 7"]:
        assert ours.encode(text) == ref.encode(text), text
    assert len(ours.encode("12345")) == 5  # one token a digit, though "123" is one token of the vocabulary
    assert len(ours.encode("abc 123")) == len(ours.encode("abc 1")) + 2
