"""Benchmarks: `python -m benchmarks.<name>`; they run the runtime with the threads policy `llmengine` uses."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as llmengine_cli/__init__.py sets it, before torch loads
