"""Kernel tests: the Triton kernels against their torch references.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before triton is
first imported (the choice is made when `@triton.jit` decorates a kernel), hence the env var at import
time here. It is harmless to the other test directories: CPU tensors still take the torch path unless
LLMENGINE_FORCE_TRITON=1, which only the `force_triton` fixture below sets. With a GPU the same tests
run the compiled kernels on CUDA tensors.
"""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning; same default

import pytest  # noqa: E402

from tests.fast import fast_subset  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # kernel_testing.py, kernel_aot.py


def _interpreter_bf16_dot() -> None:
    """The triton interpreter keeps bf16 tensors as their uint16 bit patterns and its tl.dot multiplies
    those patterns (triton-lang/triton#11584, "not supported yet"). Widen bf16 dot operands to fp32
    first (exact), which is what the GPU's bf16 MMA computes with fp32 accumulation."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_bf16(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot()


@pytest.fixture(scope="session")
def device() -> str:
    if HAS_CUDA:
        return "cuda"
    from triton.runtime.interpreter import InterpretedFunction

    from llmengine_runtime.kernels.store_kv import store_kv_kernel

    if not isinstance(store_kv_kernel, InterpretedFunction):
        pytest.fail("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: "
                    "run with TRITON_INTERPRET=1 in the environment")
    return "cpu"


@pytest.fixture
def force_triton(monkeypatch):
    """Send CPU tensors through the Triton path of the kernel entry points for this test only."""
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled float tensors, so that an output element a
    kernel forgets to write shows up as NaN instead of whatever memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


@pytest.fixture(params=fast_subset([1, 2, 4], [2]), ids=lambda n: f"threads{n}")
def threads(request):
    """torch's thread count for the test: how many keys each chunk of the C++ decode attention gets depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
