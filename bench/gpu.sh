#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md, on a machine with an NVIDIA GPU:
#   NF4 QLoRA training tokens/s and peak memory on a ~0.8B Llama built from config (random weights,
#   nothing downloaded), the farm's model/optimizer path vs a plain Trainer + PEFT baseline, and the
#   NF4 footprint per parameter vs the QLoRA paper. Writes bench/results/gpu.json.
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
exec "$PY" bench/gpu_bench.py "$@"
