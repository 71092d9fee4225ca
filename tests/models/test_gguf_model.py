"""A GGUF served as it is (models/gguf_model.py): its Q4_0/Q4_1/Q8_0 integers kept, the rest dequantized as
`llmengine convert` does; the logits equal those of the fp32 model whose weights are the same integers dequantized
(`gguf.quants.dequantize`, which is what the converted folder holds), within the error that the CPU kernels'
roundings make.

The tolerance. Our CPU kernels (`backend == "cpu"`) round each projection's input to int8 per block of 32 (1/254
of the block's largest magnitude) and keep the file's fp16 scales as they are; torch's kernels (`"torch"`, without
ours) round the input, the output and the scales to bf16 (2^-8 relative each). Errors of random sign that the later
layers carry on. How far they move the logits depends on the model, so it is measured on the model itself:
`emulation` runs the fp32 reference with exactly these roundings put in (each projection computes
`fq(x) @ W^T`, resp. `bf16(bf16(x) @ bf16-scaled W^T)`, in fp32), and its distance E from the reference is what
such roundings do. The quantized model must lie within 2 E (rms over the logits), and nearer the emulation than E:
the kernels make the same roundings in their own summation order (ours, measured: ~1.0 E from the reference and
~0.1 E from the emulation; torch's: 1.12 E and 0.52 E on the default model, on the tiny ones 1.00 E). A wrong
weight, a row left in llama.cpp's rotary order or a dropped bias moves the logits by far more (the tiny tests
check that 2 E is well below the distance to the unquantized original weights).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from llmengine_runtime.kernels.cpu.reference import fake_quantize_activations
from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.gguf import SOURCE_RECORD, convert_gguf, gguf_source
from llmengine_runtime.models.gguf_model import quantized_projections, raw_projections
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.loader import load_model
from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.models.tokenizer import Tokenizer
from llmengine_runtime.models.zoo import resolve_model
from tests.fast import fast_subset
from tests.models.test_gguf import write_tiny_gguf

Q = GGMLQuantizationType
PROMPTS = [[5, 17, 99, 3, 64, 8, 21, 40, 41], [7, 100, 2, 45]]
# (projection type, tied embedding, the o_proj's own type): Q4_1 with a Q8_0 projection (as the default model's
# Q8_0 table), Q4_0 untied with a float (F16) projection, and Q8_0 throughout (int8 per 32: two int4 planes)
FILES = [(Q.Q4_1, True, Q.Q8_0), (Q.Q4_0, False, Q.F16), (Q.Q8_0, True, None)]


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


class RoundedLinear(torch.nn.Module):
    """What a CPU quantized layer computes, in fp32 with W as given: ours `fq(x) @ W^T + bias` (fq: the int8
    rounding per block of 32, kernels/cpu/reference.py), torch's `bf16(bf16(x) @ W^T) + bias`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
        super().__init__()
        self.weight, self.bias, self.backend = weight, bias, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu":
            y = F.linear(fake_quantize_activations(x), self.weight)
        else:
            y = bf16(F.linear(bf16(x), self.weight))
        return y if self.bias is None else y + self.bias


def emulation(reference, quantized) -> torch.nn.Module:
    """The fp32 `reference` model (unpacked) with each projection that `quantized` keeps as integers replaced by a
    RoundedLinear of the quantized layer's weight (its stored scales included); float projections stay as they are."""
    layers = dict(quantized.named_modules())
    for name, m in list(reference.named_modules()):
        if isinstance(m, Linear) and isinstance(layers[name], QuantizedLinear):
            parent, _, attr = name.rpartition(".")
            layer = layers[name]
            setattr(reference.get_submodule(parent), attr, RoundedLinear(layer.dequantize(), m.bias, layer.backend))
    head = quantized.quantized_head
    reference.compute_logits = (lambda h: RoundedLinear(head.dequantize(), None, head.backend)(h)) \
        if head is not None else reference.compute_logits
    return reference


def logits(model, prompts: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts([len(p) for p in prompts])))


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def assert_within_roundings(quantized, reference_dir, prompts, k: float = 1.0) -> tuple[float, float]:
    """rms(quantized - emulation) <= k E and rms(quantized - reference) <= (1 + k) E, E = rms(emulation - reference)
    (module docstring); returns the error and the tolerance (1 + k) E, relative to the logits' rms. k = 1 in
    general; a shallow model on our kernels, which the emulation reproduces up to their fp32 summation order, takes
    k = 0.01 (measured 1e-5 E on 2 layers; over 30 layers, an input that sits on an int8 rounding boundary rounds
    differently in a different summation order, and such flips add up to ~0.9 E)."""
    reference = logits(load_model(reference_dir, progress=False, pack=False), prompts)
    emulated = logits(emulation(load_model(reference_dir, progress=False, pack=False), quantized), prompts)
    got = logits(quantized, prompts)
    scale = rms(reference)
    error, emulation_error = rms(got - reference) / scale, rms(emulated - reference) / scale
    assert 0 < error <= (1 + k) * emulation_error, f"rms error {error:.4g} of the logits' rms, E {emulation_error:.4g}"
    assert rms(got - emulated) / scale <= k * emulation_error
    return error, (1 + k) * emulation_error


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.mark.parametrize("qtype, tied, odd", fast_subset(FILES, FILES[:1]),
                         ids=["Q4_1-tied-Q8_0", "Q4_0-untied-F16", "Q8_0-tied"])
def test_tiny_gguf_integers_match_their_dequantized_model(tmp_path, models_dir, qtype, tied, odd):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, tied=tied, odd_tensor=odd)
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted", progress=False)
    assert gguf_source(converted) == (tmp_path / "tiny.gguf").resolve()
    served = resolve_model(tmp_path / "tiny.gguf")  # the GGUF itself: a weightless folder under the models dir
    assert served.parent == models_dir / ".gguf" and not list(served.glob("*.safetensors"))
    assert json.loads((served / "config.json").read_text()) == json.loads((converted / "config.json").read_text())
    assert (served / "tokenizer.json").read_text() == (converted / "tokenizer.json").read_text()
    assert resolve_model(tmp_path / "tiny.gguf") == served  # made once

    model = load_model(served, quantize="auto", progress=False)
    kept = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {f"layers.{i}.{p}" for i in range(2) for p in ("attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    expected |= {f"layers.{i}.attn.o_proj" for i in range(2)} if odd != Q.F16 else set()
    expected |= {"quantized_head"} if tied else {"lm_head"}
    assert kept == expected
    assert model.lm_head is None if tied else isinstance(model.lm_head, QuantizedLinear)
    if odd == Q.Q8_0:
        assert model.layers[0].attn.o_proj.mode == "int8" and model.layers[0].attn.qkv_proj.mode == "int4"
    assert model.quantization.startswith("GGUF ")
    backends = {m.backend for m in model.modules() if isinstance(m, QuantizedLinear)}
    error, tolerance = assert_within_roundings(model, converted, PROMPTS, 0.01 if backends == {"cpu"} else 1.0)

    # the same folder through the other modes: float from the GGUF equals the converted fp32 folder exactly
    float_model = load_model(served, quantize=None, progress=False, pack=False)
    assert float_model.quantization is None
    assert torch.equal(logits(float_model, PROMPTS), logits(load_model(converted, progress=False, pack=False),
                                                           PROMPTS))
    # the tolerance can tell the file's weights from the original ones they were quantized from
    assert tolerance < 0.5 * distance_to_original(tmp_path, original, converted)


def distance_to_original(tmp_path, original, converted) -> float:
    """rms distance (relative) from the converted model's logits to the model with the unquantized weights."""
    from safetensors.numpy import save_file

    folder = tmp_path / "original"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((converted / name).read_text())
    save_file(original, folder / "model.safetensors")
    reference = logits(load_model(converted, progress=False, pack=False), PROMPTS)
    return rms(logits(load_model(folder, progress=False, pack=False), PROMPTS) - reference) / rms(reference)


def test_auto_means_float_without_a_gguf_source(tmp_path, models_dir):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_1)
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted", progress=False)
    assert load_model(converted, quantize="auto", progress=False, device="cpu").quantization.startswith("GGUF")
    (converted / SOURCE_RECORD).unlink()  # a plain safetensors folder: auto = its own float weights
    plain = load_model(converted, quantize="auto", progress=False)
    assert plain.quantization is None and not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    assert load_model(converted, quantize="int8", progress=False).quantization == "int8 per channel"
    with pytest.raises(ValueError, match="quantize='int3'"):
        load_model(converted, quantize="int3", progress=False)


def test_moved_gguf_is_a_clear_error(tmp_path, models_dir):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_0)
    served = resolve_model(tmp_path / "tiny.gguf")
    (tmp_path / "tiny.gguf").rename(tmp_path / "moved.gguf")
    with pytest.raises(ValueError, match="GGUF that gguf_source.json names is missing"):
        load_model(served, progress=False)


def test_mixed_kinds_in_one_fused_projection_keep_their_bytes():
    """q Q4_1 with k Q8_0 cannot share one integer layer: that qkv keeps the file's bytes (a GGUF layer), as does an
    own Q6_K head; gate (Q4_0) with up (Q4_1) is one int4 layer, down (Q8_0) an int8 one, o (F16) a float one."""
    from llmengine_runtime.models.causal_lm import CausalLM
    from llmengine_runtime.models.config import parse_config
    from tests.models.tiny import LLAMA_BASE

    with torch.device("meta"):
        model = CausalLM(parse_config(dict(LLAMA_BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                                           num_hidden_layers=1)))
    types = {"self_attn.q_proj": Q.Q4_1, "self_attn.k_proj": Q.Q8_0, "self_attn.v_proj": Q.Q4_1,
             "self_attn.o_proj": Q.F16, "mlp.gate_proj": Q.Q4_0, "mlp.up_proj": Q.Q4_1, "mlp.down_proj": Q.Q8_0}
    tensors = {f"model.layers.0.{name}.weight": SimpleNamespace(tensor_type=t) for name, t in types.items()}
    tensors["lm_head.weight"] = SimpleNamespace(tensor_type=Q.Q6_K)
    assert quantized_projections(model, tensors) == {
        "layers.0.mlp.gate_up_proj": ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"],
        "layers.0.mlp.down_proj": ["model.layers.0.mlp.down_proj.weight"]}
    assert raw_projections(model, tensors) == {
        "layers.0.attn.qkv_proj": [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"],
        "lm_head": ["lm_head.weight"]}


@pytest.mark.slow  # two loads of the default model and three forward passes over its 30 layers
def test_default_model_gguf_integers_match_its_imported_fp32(default_model_dir):
    """The shipped Q4_1 projections and Q8_0 head as integers, against the imported fp32 folder (the same integers
    dequantized), on one prompt."""
    assert gguf_source(default_model_dir) is not None  # the import records its GGUF
    model = load_model(default_model_dir, quantize="auto", progress=False)
    assert model.quantization == "GGUF Q4_1 x210, Q8_0 (tied head) x1"
    assert isinstance(model.quantized_head, QuantizedLinear) and model.quantized_head.mode == "int8"
    prompt = Tokenizer.from_folder(default_model_dir).encode("Suggest a name for an icecream shop. Here are some")
    error, tolerance = assert_within_roundings(model, default_model_dir, [prompt])
    assert tolerance < 0.1  # measured with our kernels: error 3.4% of the logits' rms, E 4.2%, tolerance 8.3%
