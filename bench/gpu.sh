#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md, on a machine with an NVIDIA GPU:
#   NF4 QLoRA training tokens/s and peak memory on a ~0.8B Llama built from config (random weights,
#   nothing downloaded), the farm's model/optimizer path vs a plain Trainer + PEFT baseline, and the
#   NF4 footprint per parameter vs the QLoRA paper. Writes bench/results/gpu.json.
#   Then the serve part (not with --cpu-smoke): bench/serve.py --gpu --engines-only: the farm engine vs
#   the vLLM engine on one GPU, a ~0.8B Llama (NF4 base on both), 1 and 32 adapters, 32 concurrent
#   clients, tokens/s and p50/p99 latency. Writes bench/results/gpu_serve.json. Needs .venv-vllm with
#   PyPI's CUDA vLLM (`make vllm-env` on the GPU machine; done here if missing).
#
#   bench/gpu.sh                     # needs nvidia-smi; installs .venv via `make install` if missing
#   bench/gpu.sh --layers 22         # ~1.1B parameters; other flags: python bench/gpu_bench.py --help
#   bench/gpu.sh --cpu-smoke         # anywhere: tiny config, CPU-safe parts only (used by the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

cpu_smoke=0
for arg in "$@"; do [[ "$arg" == "--cpu-smoke" ]] && cpu_smoke=1; done

if [[ $cpu_smoke -eq 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi not found); use --cpu-smoke for the CPU-safe parts" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# The Makefile installs PyPI's CUDA torch when nvidia-smi exists, the CPU build otherwise.
[[ -x "$PY" ]] || make install
"$PY" bench/gpu_bench.py "$@"
if [[ $cpu_smoke -eq 0 ]]; then
    [[ -x .venv-vllm/bin/python ]] || make vllm-env
    "$PY" bench/serve.py --gpu --engines-only --adapters 32 --concurrency 32 --requests 512 --max-tokens 64 \
        --out bench/results/gpu_serve.json
fi
