"""`python -m llmengine_runtime.cli ...` is the `llmengine` command."""

import sys

from llmengine_runtime.cli import main

if __name__ == "__main__":  # tensor-parallel workers are spawned: they import this module again, and must not run it
    sys.exit(main())
