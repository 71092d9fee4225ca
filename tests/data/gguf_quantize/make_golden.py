"""Write the golden fixture of tests/models/test_gguf_quantize_golden.py: llama.cpp's own quantization of small
fixed F32 tensors, for every type our quantizers write (models/gguf_quantize*.py) and the mixtures we copy.

    .venv/bin/pip install llama-cpp-python==0.3.36    # the `[llamacpp]` extra (compiles llama.cpp)
    .venv/bin/python tests/data/gguf_quantize/make_golden.py

For each of two tiny llama-architecture inputs (`{tied,untied}_f32.gguf`, written here with gguf-py from a fixed
seed) it runs `llama_model_quantize` once per file type in FTYPES and gathers every tensor llama.cpp quantized into
`{tied,untied}_golden.gguf`, named `FTYPE/tensor`. The tensors are not a working model: llama-quantize reads the
hyperparameters but never checks tensor shapes, so rows are few (a handful per tensor) while the widths are the
ones that decide the types: 256-multiples for the k-quants, 96 and 32 to force llama.cpp's fallbacks. A tensor of
one row is a vector to ggml (untied ffn_up): llama-quantize leaves it F32. Some blocks
are made awkward on purpose (zeros, a negative constant, tiny values, sign ties, outliers, all-positive).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

HERE = Path(__file__).parent
FTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
HIDDEN = 256


def fixtures() -> dict[str, dict]:
    """name -> (block_count, {tensor: (rows, cols)}), tensors in llama.cpp's order."""
    tied = {"token_embd.weight": (6, 256), "output_norm.weight": (256,)}
    for i in range(8):
        tied |= {f"blk.{i}.attn_norm.weight": (256,), f"blk.{i}.attn_q.weight": (3, 256),
                 f"blk.{i}.attn_k.weight": (2, 256), f"blk.{i}.attn_v.weight": (2, 256),
                 f"blk.{i}.attn_output.weight": (3, 96), f"blk.{i}.ffn_norm.weight": (256,),
                 f"blk.{i}.ffn_gate.weight": (2, 256), f"blk.{i}.ffn_up.weight": (2, 256),
                 f"blk.{i}.ffn_down.weight": (2, 512)}
    untied = {"token_embd.weight": (5, 96), "output.weight": (4, 256), "output_norm.weight": (256,)}
    for i in range(3):
        untied |= {f"blk.{i}.attn_norm.weight": (256,), f"blk.{i}.attn_q.weight": (2, 512),
                   f"blk.{i}.attn_k.weight": (1, 512), f"blk.{i}.attn_v.weight": (2, 512),
                   f"blk.{i}.attn_output.weight": (2, 32), f"blk.{i}.ffn_norm.weight": (256,),
                   f"blk.{i}.ffn_gate.weight": (2, 768), f"blk.{i}.ffn_up.weight": (1, 768),
                   f"blk.{i}.ffn_down.weight": (2, 256)}
    return {"tied": {"layers": 8, "tensors": tied}, "untied": {"layers": 3, "tensors": untied}}


def awkward(w: np.ndarray, rng: np.random.RandomState) -> None:
    """Overwrite some blocks of a matrix in place with the cases the searches treat specially."""
    flat = w.reshape(-1)
    n = flat.size
    cases = [np.zeros(32), np.full(32, -0.013), rng.standard_normal(32) * 1e-20, np.abs(rng.standard_normal(32)) + 0.5,
             np.zeros(16), np.concatenate([[0.07, -0.07], rng.standard_normal(30) * 0.01])]
    for j, case in enumerate(cases):
        start = (j * 64 + 32) % n
        if start + case.size <= n:
            flat[start:start + case.size] = case
    flat[rng.randint(n)] *= 40.0  # an outlier
    if n >= 1024:
        flat[256:512] = 0.0  # a whole super-block of zeros


def write_input(path: Path, spec: dict, seed: int) -> None:
    rng = np.random.RandomState(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(spec["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(64)
    writer.add_file_type(0)  # ALL_F32
    for name, shape in spec["tensors"].items():
        if len(shape) == 1:
            w = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            row_scale = 0.02 * np.exp(rng.uniform(-1.5, 1.5, size=(shape[0], 1)))
            w = (rng.standard_normal(shape) * row_scale).astype(np.float32)
            awkward(w, rng)
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        sys.exit(f"llama_model_quantize failed for {src} -> {ftype}")


def main() -> None:
    for index, (name, spec) in enumerate(fixtures().items()):
        src = HERE / f"{name}_f32.gguf"
        write_input(src, spec, seed=1234 + index)
        golden = GGUFWriter(str(HERE / f"{name}_golden.gguf"), "llama")
        with tempfile.TemporaryDirectory() as tmp:
            for ftype in FTYPES:
                out = Path(tmp) / f"{ftype}.gguf"
                quantize(src, out, ftype)
                for t in GGUFReader(str(out)).tensors:
                    if t.tensor_type != GGMLQuantizationType.F32:
                        golden.add_tensor(f"{ftype}/{t.name}", np.array(t.data), raw_dtype=t.tensor_type)
        golden.write_header_to_file()
        golden.write_kv_data_to_file()
        golden.write_tensors_to_file()
        golden.close()
        print(f"wrote {src.name} and {name}_golden.gguf")


if __name__ == "__main__":
    main()
