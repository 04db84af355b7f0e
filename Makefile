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

.PHONY: demo test lint format install install-dev lab models clean help \
	book book-deps browser-deps exercises notebooks

help:
	@echo "make demo    set up .venv and generate text with the bundled model (tokens/s)"
	@echo "make test    set up .venv with test tools, then lint and run the test suite"
	@echo "make lab     open JupyterLab on the notebooks"
	@echo "make book    execute the notebooks and build the book into build/book (offline, -W)"
	@echo "make exercises  regenerate exercises/ from solutions/ (after editing a solution)"
	@echo "make notebooks  execute every notebook on CPU and print each one's time"
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

# `make test` also runs the teaching surface: notebooks, exercises, the book and its
# browser test, which need MathJax (npm) and Chromium (Debian); a missing one fails there.
test: lint book-deps browser-deps
	MINILLM_REQUIRE_BOOK=1 $(BIN)/pytest

# MathJax for offline math in the book, from the npm registry.
MATHJAX := build/npm/node_modules/mathjax/es5/tex-chtml.js
$(MATHJAX):
	npm install --prefix build/npm mathjax@3.2.2 --no-audit --no-fund --loglevel=error

book-deps: $(VENV)/.installed-dev $(MATHJAX)

# Chromium for the browser test, installed only if missing (CI runs as root on Debian).
browser-deps:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || { echo "could not install chromium: install the Debian package 'chromium'"; exit 1; }

book: book-deps
	$(BIN)/python -m minillm.exercises book

exercises: $(VENV)/.installed-dev
	$(BIN)/python -m minillm.exercises build
	$(BIN)/python -m minillm.exercises check

notebooks: $(VENV)/.installed-dev
	$(BIN)/python -m minillm.exercises notebooks

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# JupyterLab at the repository root (notebooks/ and exercises/ side by side), on the tour.
# (Jupyter refuses to run as root unless told: containers and CI machines run as root.)
lab: $(VENV)/.installed-dev
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) --ServerApp.root_dir=. \
		--LabApp.default_url=/lab/tree/notebooks/00_tour.ipynb

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
