"""Which implementation a kernel entry point runs: Triton for CUDA tensors, the torch reference on CPU.

`LLMENGINE_FORCE_TRITON=1` sends CPU tensors to the Triton kernels as well; that only works under
`TRITON_INTERPRET=1`, which is how the tests check the kernels on a machine without a GPU.
"""

import os

import torch


def force_triton() -> bool:
    return os.environ.get("LLMENGINE_FORCE_TRITON", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or force_triton()
