"""Our C++ CPU kernels (AVX2 where the CPU has it): built once per machine with the system C++ compiler
against the installed torch, loaded as `torch.ops.llmengine_cpu.*`.

- quant_gemm.cpp: int4 / int8 weights times int8-quantized activations (`q4_linear`, `q8_linear`); quantize_x.cpp
  quantizes the activations per block of 32 (quant_common.h).
- layers.cpp: `rms_norm` (with the residual add), `silu_and_mul`, `rotary`.
- attention.cpp: `store_kv` and paged `decode_attention`.
- sampling.cpp: `greedy_sample`, argmax and its log-prob in one pass (runtime/sampler.py's greedy path);
  sample_rows.cpp: top-k/top-p truncation and draws; top_log_probs.cpp: each row's top-N log-probs.
- falcon_layers.cpp: `layer_norm` (with bias) and `gelu` (erf), Falcon's.
- decode_step.cpp, decoder.cpp: `LlamaDecoder`, a whole decode step of a quantized Llama (or Falcon: falcon_step.cpp)
  through the above (models/fused_decode.py decides when it applies), and its C entry point for the engine's steps
  (`step_function`, called through ctypes).

`available()` builds (first time, ~1 minute, logged) or loads the library and says whether the ops are there;
without a compiler, or with `LLMENGINE_CPU_KERNELS=0`, it is False and callers use the plain-torch references.
The library lives in `$LLMENGINE_CACHE_DIR/cpu_kernels/<hash>/` (default `~/.cache/llmengine`); the hash covers
the sources, the compiler command, the torch version and this CPU's flags, so a change in any rebuilds it.
`python -m llmengine_runtime.kernels.cpu` builds it ahead of time (`make run` and `make test` do).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from llmengine_runtime.kernels.dispatch import force_triton

log = logging.getLogger("llmengine.kernels.cpu")
SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
PRELUDE = Path(__file__).parent / "torch_prelude.h"  # precompiled once per build (_compile_commands)
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-std=c++20", "-DNDEBUG", "-w"]


def march() -> str:
    """The compiler's -march: `native` (this CPU's every instruction), or a lower target to test the code paths
    another CPU takes, e.g. `x86-64-v3` (AVX2) on an AVX-512 machine (LLMENGINE_CPU_MARCH; make test-isa)."""
    return os.environ.get("LLMENGINE_CPU_MARCH", "native")


def enabled() -> bool:
    return os.environ.get("LLMENGINE_CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile_commands(out: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """The precompiled header's command (torch_prelude.h into `out`), each source's and the link's."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX", "g++")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in include_paths()]
    objects = [out / f"{src.stem}.o" for src in SOURCES]
    flags = [f"-march={march()}", *FLAGS, abi, *includes]
    prelude = [cxx, *flags, "-x", "c++-header", str(PRELUDE), "-o", str(out / f"{PRELUDE.name}.gch")]
    # (the compiler takes out/torch_prelude.h.gch when its flags match, else reads the header from its own folder)
    first = [f"-I{out}", f"-I{PRELUDE.parent}", "-include", PRELUDE.name]
    compiles = [[cxx, *first, *flags, "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]
    libs = library_paths()[0]
    link = [cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(out / "llmengine_cpu.so"), f"-L{libs}",
            "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libs}"]
    return prelude, compiles, link


def library_path() -> Path:
    """Where this machine's build lives (whether or not it is built yet)."""
    prelude, compiles, link = _compile_commands(Path("."))
    digest = hashlib.sha256()
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    digest.update(repr((prelude, compiles, link, torch.__version__, _cpu_flags(), sys.version_info[:2])).encode())
    root = Path(os.environ.get("LLMENGINE_CACHE_DIR", Path.home() / ".cache" / "llmengine"))
    return root / "cpu_kernels" / digest.hexdigest()[:16] / "llmengine_cpu.so"


def build(quiet: bool = False) -> Path:
    """Compile the sources into `library_path()` unless it is there; a file lock keeps concurrent builders
    (test workers, server processes) from racing. Raises RuntimeError with the compiler's output on failure."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
        tmp = target.parent / f"tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        prelude, compiles, link = _compile_commands(tmp)
        start = time.perf_counter()
        say = (lambda msg: None) if quiet else (lambda msg: print(f"kernels.cpu: {msg}", file=sys.stderr, flush=True))
        say(f"compiling {len(SOURCES)} C++ kernel files for -march={march()} (once per machine, ~30 s) ...")

        def run(cmd: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True)

        run(prelude)  # (if it fails, each file reads the torch headers itself: slower, the same objects)
        with ThreadPoolExecutor(max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
            results = list(pool.map(run, compiles))
        results.append(run(link) if all(r.returncode == 0 for r in results) else results[-1])
        failed = [r for r in results if r.returncode != 0]
        if failed:
            command, error = " ".join(failed[0].args), failed[0].stderr[-4000:]
            raise RuntimeError(f"compiling the CPU kernels failed:\n{command}\n{error}")
        os.replace(tmp / "llmengine_cpu.so", target)
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"built {target} in {time.perf_counter() - start:.0f} s")
    return target


@cache
def _load() -> bool:
    if not enabled():
        return False
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("CPU kernels unavailable, using the plain-torch references: %s", e)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes of the weight products for torch.compile (the other ops are not used while compiling)."""
    for name in ("q4_linear", "q8_linear"):
        torch.library.register_fake(f"llmengine_cpu::{name}")(
            lambda x, qs, *rest: x.new_empty(x.shape[0], qs.shape[0]))
    for name in ("q4x8_linear", "q8x8_linear"):  # eight rows interleaved: qs [N / 8, ...]
        torch.library.register_fake(f"llmengine_cpu::{name}")(
            lambda x, qs, *rest: x.new_empty(x.shape[0], qs.shape[0] * 8))
    torch.library.register_fake("llmengine_cpu::float_linear")(  # fp32 out, whatever x's type
        lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0] * 8, dtype=torch.float32))


def available() -> bool:
    """True when `torch.ops.llmengine_cpu` is loaded (built first if needed) and not disabled."""
    return enabled() and _load()


@cache
def step_function() -> ctypes._CFuncPtr:
    """decoder.cpp's `llme_step(handle, num_seqs, num_tokens, num_logits, argmax, error, error_size) -> int` (0: done;
    1: the message is in `error`), from the library `available()` loaded: the engine's C++ steps call it through
    ctypes."""
    function = ctypes.CDLL(str(library_path())).llme_step
    function.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                         ctypes.c_char_p, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


KV_CACHE_DTYPES = (torch.float32, torch.float16)  # what the C++ attention reads and stores (kv_rows.h)


def cpu_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The C++ store and attention take these caches: contiguous CPU tensors, both fp32 or both fp16."""
    return (k_cache.device.type == "cpu" and k_cache.dtype in KV_CACHE_DTYPES and v_cache.dtype == k_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def cpu_logits(logits: torch.Tensor) -> bool:
    """The C++ sampling kernels (sampling.cpp, sample_rows.cpp) take these logits: CPU fp32 `[B, V]`, rows
    contiguous, the kernels loaded."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(-1) == 1 and available())


def use_cpu_kernel(*tensors: torch.Tensor) -> bool:
    """The fp32 CPU fast path applies: every tensor fp32 on the CPU, the kernels loaded, not forced to Triton
    (tests run the Triton kernels on the CPU under the interpreter), and not inside torch.compile (which
    compiles the plain-torch references instead)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and not force_triton()
            and not torch.compiler.is_compiling() and available())
