# Every target sets itself up on a fresh machine (no GPU, no model hub needed):
#   make test   - install into .venv, build the tiny models, run the whole test suite
#   make demo   - install, build the tiny models, train customer_x's adapter through the farm, generate
#   make bench  - run the benchmarks under bench/
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.farm-installed
MODELS := models/.built
# torch: the CPU build on machines without an NVIDIA GPU (an unpinned torch pulls a multi-GB CUDA
# build). TORCH_SPEC may be overridden, e.g. TORCH_SPEC="torch==2.13.0" on a GPU box takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PYTEST_ARGS ?=

.PHONY: test demo bench install models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "farm needs Python >= 3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: installing torch from PyPI"; $(PIP) "torch>=2.4"; \
	 else $(PIP) "$(TORCH_SPEC)"; fi
	$(PIP) -e '.[dev]'
	@touch $@

$(MODELS): $(STAMP) farm/tiny.py $(wildcard jobs/data/*.jsonl)
	$(PY) -m farm.tiny models $(sort $(wildcard jobs/data/*.jsonl))
	@touch $@

models: $(MODELS)

test: $(STAMP) $(MODELS)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP) $(MODELS)
	$(PY) -m farm.demo jobs/customer_x.yaml

bench: $(STAMP) $(MODELS)
	$(PY) bench/run_all.py

clean:
	rm -rf models bench/results .pytest_cache
