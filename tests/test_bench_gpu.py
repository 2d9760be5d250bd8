"""bench/gpu.sh keeps working where there is no GPU: its CPU-safe parts run as a quick smoke test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "cpu-smoke"
    farm = r["farm"]
    assert farm["tokens"] == r["shape"]["steps"] * r["shape"]["batch_size"] * r["shape"]["seq_len"]
    assert farm["tokens_per_s"] > 0 and farm["optimizer"] == "adamw"  # optimizer auto on CPU
    fp = farm["footprint"]
    assert fp["quantized_layers"] == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert fp["weight_bits_per_param"] == 4.0  # NF4: two weights per byte
    # Double quant: 8-bit absmax per 64 weights + fp32 per 256 blocks, as in the QLoRA paper.
    assert abs(fp["bits_per_param_blockwise"] - fp["qlora_paper_bits_double_quant"]) < 0.01
    # Packed training (the pack worker's step) at K jobs: aggregate tokens/s of K jobs' own tokens.
    packed = r["packed"]["rows"]
    assert [row["k"] for row in packed] == [1, 2]
    for row in packed:
        assert row["tokens"] == row["k"] * r["shape"]["steps"] * r["shape"]["batch_size"] * r["shape"]["seq_len"]
        assert row["tokens_per_s"] > 0 and row["over_single_tokens_per_s"] > 0
    assert "skipped" in r["baseline"] and "skipped" in r["serve"]
    assert "skipped" in proc.stdout  # each skipped part says so, and why


def test_gpu_sh_refuses_without_gpu_unless_smoke(tmp_path):
    # A PATH with only what the script needs besides nvidia-smi, so this holds on GPU machines too.
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))
    env = {**os.environ, "PY": sys.executable, "PATH": str(tmp_path)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "bench" / "gpu.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr
