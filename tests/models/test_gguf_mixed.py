"""A GGUF whose tensors mix the types of models/gguf_types.py's table, as llama-quantize's Q4_K_M files do
(written here with gguf-py from random valid block bytes: gguf-py cannot quantize K types), served as it is
(models/gguf_model.py): each projection on its path, the logits those of the float model of gguf-py's dequantized
weights within the activation roundings (the error E that tests/models/test_gguf_model.py's emulation measures),
greedy tokens through runtime.LLM, and a type outside the table refused by name."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize

from llmengine_runtime.models.gguf import hf_name
from llmengine_runtime.models.gguf_linear import GGUFEmbedding, GGUFLinear, GGUFRowParts
from llmengine_runtime.models.gguf_types import TYPES
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.loader import load_model
from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.models.zoo import resolve_model
from tests.fast import fast_subset
from tests.models.test_gguf import gpt2_vocab, unpermute_by_index
from tests.models.test_gguf_model import PROMPTS, emulation, logits, rms
from tests.models.test_gguf_types import FP16_FIELDS, random_rows

Q = GGMLQuantizationType


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


MIXED_HIDDEN, MIXED_FFN, MIXED_HEADS, MIXED_KV_HEADS = 256, 512, 4, 2  # K-type rows are whole 256-blocks
MIXED_TYPES = {  # llama.cpp tensor name (after blk.i.) -> type, per layer; fused parts of different types included
    0: {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q4_K,
        "ffn_up": Q.Q4_K, "ffn_down": Q.Q8_0},
    1: {"attn_q": Q.F16, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q5_1, "ffn_gate": Q.Q2_K,
        "ffn_up": Q.Q3_K, "ffn_down": Q.Q5_K},
}


def random_file_rows(qtype, n: int, k: int, rng) -> np.ndarray:
    """Random valid bytes of `[n, k]` weights of rms ~0.05: random integer fields with random fp16 scales, the
    scales then rescaled together (every type's weights are linear in its fp16 fields), since gguf-py cannot
    quantize K types. Float types: random normal weights."""
    if qtype not in (*FP16_FIELDS, Q.F16, Q.BF16):  # a type outside the table: any bytes
        return rng.integers(0, 256, (n, k // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    if qtype not in FP16_FIELDS:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        return w.astype(np.float16).view(np.uint8) if qtype == Q.F16 else \
            (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = random_rows(qtype, n, k, rng)
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = (rng.standard_normal(len(blocks)) + 2).astype(np.float16).view(
            np.uint8).reshape(-1, 2)
    factor = 0.05 / rms(torch.from_numpy(dequantize(raw, qtype)))
    for offset in FP16_FIELDS[qtype]:
        scaled = blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32) * factor
        blocks[:, offset:offset + 2] = scaled.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def write_mixed_gguf(path, table_type, tied: bool, head_type=None, overrides=None) -> dict[str, np.ndarray]:
    """A random 2-layer llama GGUF with MIXED_TYPES' projections (`overrides`: {"blk.i.part": type}) and a
    `table_type` embedding (and a `head_type` output unless tied); returns its weights as gguf-py dequantizes
    them, in HF names and row order."""
    rng = np.random.default_rng(7)
    tokens, types, merges, _ = gpt2_vocab()
    w = GGUFWriter(path, "llama")
    for add, value in [(w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, MIXED_HIDDEN),
                       (w.add_feed_forward_length, MIXED_FFN), (w.add_head_count, MIXED_HEADS),
                       (w.add_head_count_kv, MIXED_KV_HEADS), (w.add_rope_dimension_count, MIXED_HIDDEN // 4),
                       (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_vocab_size, len(tokens)), (w.add_tokenizer_model, "gpt2"),
                       (w.add_tokenizer_pre, "default"),
                       (w.add_token_merges, merges), (w.add_token_list, tokens), (w.add_token_types, types),
                       (w.add_bos_token_id, 1), (w.add_eos_token_id, 2)]:
        add(value)
    head_dim = MIXED_HIDDEN // MIXED_HEADS
    shapes = {"token_embd": (len(tokens), MIXED_HIDDEN, table_type), "output_norm": (MIXED_HIDDEN,)}
    if not tied:
        shapes["output"] = (len(tokens), MIXED_HIDDEN, head_type)
    for i, layer in MIXED_TYPES.items():
        rows = {"attn_q": MIXED_HIDDEN, "attn_k": MIXED_KV_HEADS * head_dim, "attn_v": MIXED_KV_HEADS * head_dim,
                "attn_output": MIXED_HIDDEN, "ffn_gate": MIXED_FFN, "ffn_up": MIXED_FFN, "ffn_down": MIXED_HIDDEN}
        shapes |= {f"blk.{i}.{part}": (n, MIXED_FFN if part == "ffn_down" else MIXED_HIDDEN, layer[part])
                   for part, n in rows.items()}
        shapes |= {f"blk.{i}.attn_norm": (MIXED_HIDDEN,), f"blk.{i}.ffn_norm": (MIXED_HIDDEN,)}
    expected = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            array = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(f"{name}.weight", array)
            expected[hf_name(f"{name}.weight")] = array
            continue
        n, k, qtype = shape
        qtype = (overrides or {}).get(name, qtype)
        raw = random_file_rows(qtype, n, k, rng)
        w.add_tensor(f"{name}.weight", raw, raw_shape=(n, raw.shape[1]), raw_dtype=qtype)
        if qtype not in TYPES:  # (the refusal test's tensor: it never loads)
            continue
        weights = dequantize(raw, qtype).reshape(n, k).astype(np.float32)
        if name.endswith(("attn_q", "attn_k")):
            weights = unpermute_by_index(weights, MIXED_HEADS if name.endswith("attn_q") else MIXED_KV_HEADS)
        expected[hf_name(f"{name}.weight")] = weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def fake_quantize_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded to int8 per `block` k's with scale max|x| / 127 (kernels/cpu/reference.py's rounding, for any
    block): what a C++ product multiplies when it quantizes x to Q8_0 (32) or Q8_K (256) blocks."""
    xb = x.float().unflatten(-1, (-1, block))
    xd = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xb / torch.where(xd > 0, xd, 1)) * xd).flatten(-2)


def emulated(layer, bias) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a GGUF layer computes, in fp32 from the weights it holds: F.linear of x, rounded to int8 blocks first
    where a part runs the C++ product (`backend == "cpu"`)."""
    parts = list(layer.parts) if isinstance(layer, GGUFRowParts) else [layer]

    def forward(x):
        ys = [F.linear(fake_quantize_blocks(x, p.entry.block) if p.backend == "cpu" else x, p.dequantize())
              for p in parts]
        y = torch.cat(ys, -1)
        return y if bias is None else y + bias
    return forward


def mixed_emulation(reference, served) -> torch.nn.Module:
    """`emulation` extended to GGUF layers (`emulated`): the fp32 reference with each projection replaced by
    what the served model's layer computes from the weights it holds."""
    layers = dict(served.named_modules())
    for name, m in list(reference.named_modules()):
        if isinstance(m, Linear) and isinstance(layers[name], (GGUFLinear, GGUFRowParts)):
            parent, _, attr = name.rpartition(".")
            fn = emulated(layers[name], m.bias)
            setattr(reference.get_submodule(parent), attr, type("Emulated", (torch.nn.Module,), {
                "forward": lambda self, x, fn=fn: fn(x)})())
    emulation(reference, served)  # the QuantizedLinears, and a QuantizedLinear tied head
    if isinstance(served.quantized_head, GGUFLinear):
        reference.compute_logits = emulated(served.quantized_head, None)
    return reference


def reference_folder(tmp_path, served, weights: dict[str, np.ndarray]):
    """A safetensors folder of `weights` (gguf-py's dequantization of the file) beside the served GGUF's config."""
    from safetensors.numpy import save_file

    folder = tmp_path / "reference"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((served / name).read_text())
    save_file(weights, folder / "model.safetensors")
    return folder


MIXED_FILES = [(Q.Q6_K, True, None), (Q.Q4_K, False, Q.Q6_K)]


@pytest.mark.parametrize("table, tied, head", fast_subset(MIXED_FILES, MIXED_FILES[:1]),
                         ids=["Q6_K-tied", "Q4_K-Q6_K-head"])
def test_mixed_types_match_their_dequantized_model(tmp_path, models_dir, table, tied, head):
    weights = write_mixed_gguf(tmp_path / "mixed.gguf", table, tied, head)
    served = resolve_model(tmp_path / "mixed.gguf")
    model = load_model(served, quantize="auto", progress=False)
    layers = dict(model.named_modules())

    def types(name):
        layer = layers[name]
        parts = layer.parts if isinstance(layer, GGUFRowParts) else [layer]
        return [p.ggml_type for p in parts]
    assert types("layers.0.attn.qkv_proj") == [Q.Q4_K, Q.Q6_K] and types("layers.0.mlp.gate_up_proj") == [Q.Q4_K]
    assert types("layers.0.attn.o_proj") == [Q.Q5_0] and types("layers.1.attn.o_proj") == [Q.Q5_1]
    assert types("layers.1.mlp.gate_up_proj") == [Q.Q2_K, Q.Q3_K] and types("layers.1.mlp.down_proj") == [Q.Q5_K]
    assert isinstance(layers["layers.0.mlp.down_proj"], QuantizedLinear)  # Q8_0 stays on the int8 path
    assert type(layers["layers.1.attn.qkv_proj"]) is Linear  # F16, F16, BF16: float
    assert isinstance(model.embed, GGUFEmbedding) and model.embed.ggml_type == table
    assert model.embed.weight.dtype == torch.float32 and model.embed.weight.numel() == 0
    if tied:  # the head reads the table's own bytes
        assert isinstance(model.quantized_head, GGUFLinear) and model.quantized_head.raw is model.embed.raw
    else:
        assert isinstance(model.lm_head, GGUFLinear) and model.lm_head.ggml_type == head
    assert f"{table.name} (embedding) x1" in model.quantization

    reference_dir = reference_folder(tmp_path, served, weights)
    reference = logits(load_model(reference_dir, progress=False, pack=False), PROMPTS)
    emulated_logits = logits(mixed_emulation(load_model(reference_dir, progress=False, pack=False), model), PROMPTS)
    got = logits(model, PROMPTS)
    scale = rms(reference)
    error, e = rms(got - reference) / scale, rms(emulated_logits - reference) / scale
    # E: what the activation roundings do (the Q8_0 down_proj's, and the C++ GGUF products' where built; without
    # them the GGUF layers are F.linear over the exact weights). Our kernels make exactly the emulation's roundings,
    # in their own fp32 summation order (measured: 1e-5 E from it on these 2 layers); torch's bf16 kernels (when
    # ours are off) round in their own places, hence k = 1 there.
    backends = {m.backend for m in model.modules() if isinstance(m, (QuantizedLinear, GGUFLinear))}
    k = 0.01 if backends <= {"cpu", "dequantized"} else 1.0
    assert 0 < error <= (1 + k) * e and rms(got - emulated_logits) / scale <= k * e, (error, e)

    # float from the same file: the table's dequantizers make exactly gguf-py's weights
    float_model = load_model(served, quantize=None, progress=False, pack=False)
    assert float_model.quantization is None and type(float_model.embed) is torch.nn.Embedding
    assert torch.equal(logits(float_model, PROMPTS), reference)


def test_mixed_gguf_serves_greedy_tokens(tmp_path, models_dir):
    """Through runtime.LLM (KV cache, decode steps, the GGUF embedding's lookups of one row): the same greedy
    tokens and log-probs as recomputing the loaded model over each whole prefix (an fp32 KV cache: "auto" would take
    fp16 here, which moves this random model's log-probs by up to 0.05)."""
    from llmengine_runtime.models.fused_decode import FusedDecode
    from llmengine_runtime.runtime.llm import LLM
    from llmengine_runtime.runtime.params import SamplingParams

    write_mixed_gguf(tmp_path / "mixed.gguf", Q.Q6_K, tied=True)
    llm = LLM(tmp_path / "mixed.gguf", device="cpu", kv_cache_gib=0.01, quantize="gguf",
              kv_cache_dtype="float32")
    model = llm.engine.model
    # eager steps (its layer 1 is float)
    assert isinstance(model.embed, GGUFEmbedding) and FusedDecode.build(model) is None
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, return_token_log_probs=True)
    got = llm.generate(PROMPTS, params, progress=False)
    for prompt, result in zip(PROMPTS, got):
        tokens, log_probs = list(prompt), []
        for _ in range(6):
            row = logits(model, [tokens])[-1].double().log_softmax(-1)
            tokens.append(int(row.argmax()))
            log_probs.append(row.max().item())
        assert result.token_ids == tokens[len(prompt):]
        assert np.allclose(result.log_probs, log_probs, rtol=0, atol=1e-5), (result.log_probs, log_probs)  # 4e-7


LLAMA_QUANTIZE = [("Q4_0", 2, {Q.Q4_0, Q.Q6_K}), ("Q4_K_M", 15, {Q.Q4_K, Q.Q6_K})]  # llama.cpp's LLAMA_FTYPE numbers


@pytest.mark.parametrize("name, ftype, expected", fast_subset(LLAMA_QUANTIZE, LLAMA_QUANTIZE[1:]),
                         ids=[c[0] for c in LLAMA_QUANTIZE])
def test_files_llama_quantize_writes(tmp_path, models_dir, name, ftype, expected):
    """An F16 file quantized by llama.cpp itself (its tied table becomes Q6_K, the issue's refused case): it loads,
    its logits lie within the activation roundings of the float model of its weights, and as near llama.cpp's own
    logits on the same file (which round activations too, in their own places)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    write_mixed_gguf(tmp_path / "f16.gguf", Q.F16, tied=True,
                     overrides={f"blk.{i}.{part}": Q.F16 for i in MIXED_TYPES for part in MIXED_TYPES[i]})
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    path = tmp_path / f"{name}.gguf"
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(), str(path).encode(),
                                          ctypes.byref(params)) == 0
    types = {Q(t.tensor_type) for t in GGUFReader(path).tensors if len(t.shape) == 2}
    assert types == expected
    served = resolve_model(path)
    model = load_model(served, quantize="gguf", progress=False)
    assert isinstance(model.embed, GGUFEmbedding) and model.embed.ggml_type == Q.Q6_K

    prompt = PROMPTS[0] + PROMPTS[1]
    reference = logits(load_model(served, quantize=None, progress=False, pack=False), [prompt])
    emulated_logits = logits(mixed_emulation(load_model(served, quantize=None, progress=False, pack=False), model),
                             [prompt])
    got = logits(model, [prompt])
    scale = rms(reference)
    e = rms(emulated_logits - reference) / scale
    assert rms(got - reference) / scale <= 1.01 * e and rms(got - emulated_logits) / scale <= 0.01 * e

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    rows = []
    for token in prompt:  # one at a time: llama.cpp's AMX kernels fault on batches of tokens in this VM
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    theirs = torch.tensor(np.array(rows), dtype=torch.float32)
    assert rms(theirs - reference) / scale <= 2 * e  # llama.cpp's roundings are of the same size
    assert rms(got - theirs) / scale <= 2 * e  # measured: 1.00 and 0.97 E (E: 1.8% and 2.4% of the logits)


def test_a_k_quant_model_gets_the_quantized_kv_cache(tmp_path, models_dir):
    """KV cache "auto" on the CPU is fp16 for quantized weights: GGUF layers count, not only QuantizedLinear."""
    from llmengine_runtime.runtime.llm import LLM

    write_mixed_gguf(tmp_path / "k.gguf", Q.Q6_K, tied=True, overrides={"blk.0.ffn_down": Q.Q6_K})
    llm = LLM(tmp_path / "k.gguf", device="cpu", kv_cache_gib=0.01, quantize="gguf")
    assert not any(isinstance(m, QuantizedLinear) for m in llm.engine.model.modules())
    assert llm.engine.kv_cache_dtype == torch.float16


def test_iq_types_are_refused_by_name(tmp_path, models_dir):
    """An IQ2_XXS tensor: a clear error naming the tensor and its type, before anything is loaded."""
    write_mixed_gguf(tmp_path / "iq.gguf", Q.Q6_K, tied=True, overrides={"blk.1.ffn_up": Q.IQ2_XXS})
    served = resolve_model(tmp_path / "iq.gguf")
    for quantize in ("auto", None):
        with pytest.raises(ValueError, match=r"GGUF tensor 'blk\.1\.ffn_up\.weight' has type IQ2_XXS, which is not "
                                             r"supported \(supported: F32, F16, BF16, Q4_0, .*, Q6_K\)"):
            load_model(served, quantize=quantize, progress=False)
