# minillm: the two quick-start commands are `make demo` and `make test`.
# Both create ./.venv if needed and install minillm into it (editable).
#
# torch is installed first and on its own, from TORCH_SPEC: on the project's CPU
# machines `torch==2.13.0` resolves to the local CPU wheel, and the later install
# of minillm then finds torch satisfied instead of pulling a multi-GB CUDA build.
# On a machine with a CUDA GPU:  make demo TORCH_SPEC=torch

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint format install install-dev lab models clean help

help:
	@echo "make demo    set up .venv and generate text with the bundled model (tokens/s)"
	@echo "make test    set up .venv with test tools, then lint and run the test suite"
	@echo "make lab     open JupyterLab on the notebooks"
	@echo "make models  retrain the bundled models (GPU recommended; see README)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/minillm generate --prompt "class Stack:" --max-new-tokens 96 --temperature 0.7 --seed 0

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lab: $(VENV)/.installed-dev
	$(BIN)/jupyter lab notebooks/

# Rebuild the bundled models from scratch: corpus, tokenizer, target, draft.
# Defaults are the settings of the shipped models (an H200 takes ~4 minutes each);
# on a CPU, pass a smaller budget, e.g. `make models TRAIN_ARGS="--steps 300 --batch-size 8"`.
MODELS_OUT ?= build/models
TRAIN_ARGS ?= --steps 3000 --batch-size 64 --seq-len 1024
models: $(VENV)/.installed
	$(BIN)/minillm corpus --out build/corpus
	$(BIN)/minillm tokenizer --data build/corpus --out build/tokenizer
	$(BIN)/minillm train --preset minillm-tiny --data build/corpus --tokenizer build/tokenizer \
		--out $(MODELS_OUT)/minillm-tiny $(TRAIN_ARGS)
	$(BIN)/minillm train --preset minillm-tiny-draft --data build/corpus --tokenizer build/tokenizer \
		--out $(MODELS_OUT)/minillm-tiny-draft $(TRAIN_ARGS)
	@echo "to ship them: cp $(MODELS_OUT)/*/* into minillm/assets/models/<name>/"

clean:
	rm -rf build .pytest_cache .ruff_cache
