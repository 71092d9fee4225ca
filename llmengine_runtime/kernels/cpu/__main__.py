"""`python -m llmengine_runtime.kernels.cpu`: build this machine's CPU kernels now (no-op when built); exit 1 if they
cannot be."""

import sys

from llmengine_runtime.kernels.cpu import build, enabled

if __name__ == "__main__":
    if not enabled():
        print("kernels.cpu: disabled by LLMENGINE_CPU_KERNELS=0")
        sys.exit(0)
    try:
        print(f"kernels.cpu: {build()}")
    except RuntimeError as e:
        print(f"kernels.cpu: {e}\nthe runtime will use the plain-torch references instead", file=sys.stderr)
        sys.exit(1)
