"""The GGUF files benchmarks/gguf_formats.py measures: random weights at a named shape written with gguf-py, then
quantized by llama.cpp itself (llama-cpp-python's `llama_model_quantize`); and an F32 export of a real GGUF's
weights, for benchmarks/gguf_formats_quality.py. Cached under ~/.cache/llmengine/gguf_formats, each file written
beside its place and renamed into it (an interrupted run leaves no half file).

The random files carry the shipped SmolLM2 GGUF's tokenizer (GPT-2 BPE, 49152 tokens), padded with unreachable
filler tokens up to the shape's vocabulary, so llama.cpp and our engine both load them; prompts are token ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm

CACHE = Path(os.environ.get("LLMENGINE_CACHE", Path.home() / ".cache" / "llmengine")) / "gguf_formats"
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")


@dataclass(frozen=True)
class Shape:
    """A llama-architecture model's shape (what decode speed depends on)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    rope_theta: float = 10000.0


SHAPES = {
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, 8, 128256, rope_theta=500000.0),
    "smollm2-135m": Shape(576, 1536, 30, 9, 3, 49152, rope_theta=100000.0),
}


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 0) -> Path:
    """`dst` = llama.cpp's `llama_model_quantize` of `src` to file type `ftype` ("Q4_K_M", ...), made once."""
    if dst.is_file():
        return dst
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("quantizing with llama.cpp needs llama-cpp-python: pip install '.[llamacpp]' "
                         "(compiles llama.cpp, a few minutes; `make bench` does it)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed: {src} -> {ftype}")
    tmp.rename(dst)
    return dst


def _field_value(field):
    """(value, value type, array element type) of a GGUFReader field, for GGUFWriter.add_key_value."""
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def tokenizer_fields(vocab: int, source: Path | None = None) -> dict:
    """The tokenizer metadata of `source` (default: the shipped SmolLM2 GGUF), its token list padded with filler
    tokens (normal, unreachable by the merges) to `vocab` entries."""
    from llmengine_runtime.models.gguf import default_gguf_path

    reader = GGUFReader(source or default_gguf_path())
    fields = {key: _field_value(reader.fields[key]) for key in TOKENIZER_KEYS if key in reader.fields}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    if vocab < len(tokens):
        raise ValueError(f"a vocabulary of {vocab} is smaller than the tokenizer's {len(tokens)}")
    tokens = tokens + [f"<filler_{i}>" for i in range(len(tokens), vocab)]
    types = types + [1] * (vocab - len(types))
    fields["tokenizer.ggml.tokens"] = (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
    fields["tokenizer.ggml.token_type"] = (types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    return fields


def _write(writer: GGUFWriter, path: Path) -> None:
    tmp = Path(writer.path) if writer.path else path
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tmp.rename(path)


def random_gguf(shape_name: str, seed: int = 0, root: Path = CACHE, float_type: str = "F16",
                tokenizer_source: Path | None = None) -> Path:
    """A random-weight llama GGUF of SHAPES[shape_name] in F16 (or F32): weights N(0, 0.02), norms 1; the
    tokenizer of `tokenizer_source` (default: the shipped SmolLM2 GGUF's), padded to the shape's vocabulary."""
    shape = SHAPES[shape_name]
    path = root / f"{shape_name}-seed{seed}" / f"{shape_name}.{float_type}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if float_type == "F16" else np.float32
    head_dim = shape.hidden // shape.heads
    writer = GGUFWriter(str(path.with_name(path.name + ".tmp")), "llama")
    for key, value in {"block_count": shape.layers, "context_length": 4096, "embedding_length": shape.hidden,
                       "feed_forward_length": shape.intermediate, "attention.head_count": shape.heads,
                       "attention.head_count_kv": shape.kv_heads, "rope.dimension_count": head_dim,
                       "vocab_size": shape.vocab}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", shape.rope_theta)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_file_type(1 if float_type == "F16" else 0)
    for key, (value, vtype, sub) in tokenizer_fields(shape.vocab, tokenizer_source).items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    q_rows, kv_rows = shape.heads * head_dim, shape.kv_heads * head_dim
    tensors = {"token_embd.weight": (shape.vocab, shape.hidden), "output_norm.weight": (shape.hidden,)}
    tensors |= {} if shape.tied else {"output.weight": (shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        tensors |= {f"blk.{i}.attn_norm.weight": (shape.hidden,), f"blk.{i}.attn_q.weight": (q_rows, shape.hidden),
                    f"blk.{i}.attn_k.weight": (kv_rows, shape.hidden),
                    f"blk.{i}.attn_v.weight": (kv_rows, shape.hidden),
                    f"blk.{i}.attn_output.weight": (shape.hidden, q_rows), f"blk.{i}.ffn_norm.weight": (shape.hidden,),
                    f"blk.{i}.ffn_gate.weight": (shape.intermediate, shape.hidden),
                    f"blk.{i}.ffn_up.weight": (shape.intermediate, shape.hidden),
                    f"blk.{i}.ffn_down.weight": (shape.hidden, shape.intermediate)}
    for name, dims in tqdm(tensors.items(), desc=f"writing {path.name}", unit="tensor", leave=False):
        if len(dims) == 1:
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))
        else:
            writer.add_tensor(name, (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(dtype))
    _write(writer, path)
    return path


def export_f32_gguf(source: Path, root: Path = CACHE) -> Path:
    """An F32 GGUF of `source`'s weights (every tensor dequantized exactly, the metadata copied, the file type
    ALL_F32): the input llama-quantize gets when a model is quantized from float weights."""
    from gguf.quants import dequantize

    path = root / "exports" / f"{source.stem}.F32.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(path.with_name(path.name + ".tmp")), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(0)
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        data = dequantize(np.asarray(t.data), GGMLQuantizationType(t.tensor_type)).reshape(shape)
        writer.add_tensor(t.name, data.astype(np.float32))
    _write(writer, path)
    return path
