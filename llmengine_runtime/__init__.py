"""llmengine-runtime: the inference runtime behind the `llmengine` command and server.

Its layers are subpackages, each importing only those below it (docs/architecture.md):
kernels <- models <- runtime <- server, with benchmarks beside the server and cli on top.
One distinctive top-level name keeps them from being shadowed by, or shadowing, distributions
such as Hugging Face's `kernels`. The SDK is the separate top-level package `llmengine`.
"""
