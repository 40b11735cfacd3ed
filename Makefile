PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TINY ?= build/tiny-model
# Tools the tests run as a user would, each in its own environment (img2dataset pins pandas < 3).
TOOLS ?= build/tools
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install tools test unit demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

tools: $(TOOLS)/.installed

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet img2dataset==1.47.0
	touch $@

test: install tools
	$(BIN)/python -m pytest -q tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

demo: install
	$(BIN)/python -m jobs.demo

clean:
	rm -rf build $(VENV)
