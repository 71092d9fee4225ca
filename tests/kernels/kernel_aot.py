"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

`python tests/kernels/kernel_aot.py ID...` compiles the named cases with triton's bundled ptxas and
prints one JSON line `{id: {"error", "mma", "shared", "seconds"}}`. It must run in a process without
TRITON_INTERPRET (the interpreter replaces `@triton.jit` functions and patches triton.language), which is
why test_kernel_compile.py runs it as a subprocess. The cases use the launch configurations the
wrappers use. head_dim is a runtime argument: only its power-of-two padding BLOCK_D (64 for 64; 128 for
80, 96, 128) changes the compiled code, so BLOCK_D 64 and 128 cover every supported head_dim.
"""

import json
import sys
import traceback

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
TORCH_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DOT_KERNELS = {"prefill_attention_kernel", "decode_attention_split_kernel", "w4a16_dot_kernel", "w8a16_dot_kernel"}
INT32_PTRS = {"cu_seqlens_q_ptr", "seq_lens_ptr", "block_tables_ptr"}
INT64_PTRS = {"slot_mapping_ptr", "positions_ptr"}
FP32_PTRS = {"alibi_slopes_ptr", "mid_out_ptr", "mid_lse_ptr", "cos_sin_ptr"}
FP32_SCALARS = {"scale", "eps"}
QUANT_PTRS = {"w_int4_ptr": "*u8", "w_int8_ptr": "*i8", "scale_ptr": "*fp16", "min_ptr": "*fp16"}  # quant_matmul


def cases() -> dict:
    """id -> (module, kernel, dtype, constexprs, launch options, arch). Configs that depend on the
    dtype come from the wrappers' own config functions."""
    import torch

    from llmengine_runtime.kernels.decode_attention import decode_launch_config
    from llmengine_runtime.kernels.norms import norm_launch_config
    from llmengine_runtime.kernels.prefill_attention import prefill_launch_config
    from llmengine_runtime.kernels.quant_matmul import quant_launch_config

    def split(config):
        options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
        return config, options

    specs = {}

    def add(name, module, kernel, dtype, constexprs, options=None):
        specs[name] = (module, kernel, dtype, constexprs, options or {})

    for dt, heads, block_d in (("fp16", 32, 128), ("bf16", 1, 64), ("fp32", 8, 128)):
        add(f"store_kv-{dt}-h{heads}-d{block_d}", "store_kv", "store_kv_kernel", dt,
            dict(BLOCK_H=heads, BLOCK_D=block_d))
    for dt, residual, hidden in (("bf16", True, 4096), ("fp16", False, 576), ("fp32", True, 4544)):
        consts, opts = split(norm_launch_config(hidden, 4 if dt == "fp32" else 2))
        add(f"rms_norm-{dt}-res{int(residual)}-{hidden}", "norms", "rms_norm_kernel", dt,
            dict(HAS_RESIDUAL=residual, **consts), opts)
    for dt, hidden in (("bf16", 4544), ("fp16", 576), ("fp32", 2048)):
        consts, opts = split(norm_launch_config(hidden, 4 if dt == "fp32" else 2))
        add(f"layer_norm-{dt}-{hidden}", "norms", "layer_norm_kernel", dt, consts, opts)
    for dt, block_h, block_half in (("bf16", 32, 64), ("fp16", 64, 32), ("fp32", 4, 64)):
        add(f"rotary-{dt}-h{block_h}-half{block_half}", "rotary", "rotary_kernel", dt,
            dict(BLOCK_H=block_h, BLOCK_HALF=block_half))
    for dt in DTYPES:
        torch_dtype = getattr(torch, TORCH_DTYPE[dt])
        precision = "tf32x3" if dt == "fp32" else "tf32"
        for block_d in (64, 128):
            consts, opts = split(prefill_launch_config(torch_dtype, block_d))
            add(f"prefill-{dt}-d{block_d}", "prefill_attention", "prefill_attention_kernel", dt,
                dict(HAS_CACHE=True, HAS_ALIBI=True, DOT_PRECISION=precision, BLOCK_D=block_d, **consts),
                opts)
            consts, opts = split(decode_launch_config(torch_dtype, 4))
            add(f"decode-{dt}-d{block_d}", "decode_attention", "decode_attention_split_kernel", dt,
                dict(HAS_ALIBI=True, DOT_PRECISION=precision, BLOCK_D=block_d, **consts), opts)
        add(f"decode_reduce-{dt}", "decode_attention", "decode_attention_reduce_kernel", dt,
            dict(BLOCK_S={"fp16": 16, "bf16": 4, "fp32": 1}[dt], BLOCK_D=128))
    consts, opts = split(prefill_launch_config(torch.bfloat16, 128))
    add("prefill-bf16-d128-nocache-noalibi", "prefill_attention", "prefill_attention_kernel", "bf16",
        dict(HAS_CACHE=False, HAS_ALIBI=False, DOT_PRECISION="tf32", BLOCK_D=128, **consts), opts)
    consts, opts = split(decode_launch_config(torch.bfloat16, 71))  # falcon-7b: 71 heads, 1 KV head
    add("decode-bf16-d64-group71", "decode_attention", "decode_attention_split_kernel", "bf16",
        dict(HAS_ALIBI=False, DOT_PRECISION="tf32", BLOCK_D=64, **consts), opts)
    # weight-only quantized products, both program shapes, each dtype once: int4 groups 32 and 64, int8 per
    # channel (group = K = 576) and per 32 (GGUF Q8_0); the rows pick BLOCK_T (GEMV) or BLOCK_M (tl.dot)
    for bits, program, variants in ((4, "gemv", (("fp16", 32, 1), ("bf16", 64, 4), ("fp32", 32, 2))),
                                     (4, "dot", (("fp16", 64, 64), ("bf16", 32, 16), ("fp32", 64, 32))),
                                     (8, "gemv", (("fp16", 576, 1), ("bf16", 32, 4), ("fp32", 576, 2))),
                                     (8, "dot", (("fp16", 32, 64), ("bf16", 576, 16), ("fp32", 32, 32)))):
        for dt, group, rows in variants:
            config = quant_launch_config(program == "gemv", rows, group, 576, getattr(torch, TORCH_DTYPE[dt]))
            consts, opts = split(config)
            add(f"w{bits}a16-{program}-{dt}-g{group}-rows{rows}", "quant_matmul", f"w{bits}a16_{program}_kernel",
                dt, consts, opts)
    return {f"{name}-sm{arch}": (*case, arch) for arch in ARCHS for name, case in specs.items()}


def signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton's ASTSource signature {arg: type} and the divisibility-16 attrs that the JIT would infer
    for torch-allocated pointers and for strides that are multiples of 16 (the common case)."""
    from triton.backends.nvidia.compiler import CUDABackend

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = QUANT_PTRS.get(name) or ("*i32" if name in INT32_PTRS else "*i64" if name in INT64_PTRS
                                                 else "*fp32" if name in FP32_PTRS else f"*{dtype}")
            attrs[(i,)] = CUDABackend.parse_attr("D")
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = CUDABackend.parse_attr("D")
    return sig, attrs


def compile_case(case) -> dict:
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget

    module, kernel, dtype, constexprs, options, arch = case
    fn = getattr(importlib.import_module(f"llmengine_runtime.kernels.{module}"), kernel)
    sig, attrs = signature(fn, dtype, constexprs)
    start = time.perf_counter()
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"error": None, "mma": "mma.sync" in ptx or "wgmma.mma_async" in ptx,
            "shared": compiled.metadata.shared, "seconds": round(time.perf_counter() - start, 2)}


def main(ids) -> None:
    all_cases = cases()
    results = {}
    for case_id in ids:
        try:
            results[case_id] = compile_case(all_cases[case_id])
        except Exception:  # reported per case by the test
            results[case_id] = {"error": traceback.format_exc(limit=-3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
