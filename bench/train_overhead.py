"""What does the farm cost on top of a bare training loop?

Runs, on the same tiny NF4 model, data and step count:
  bare  - a plain PEFT + bitsandbytes loop in a fresh Python process (no Ray, no farm)
  cold  - `farm train` in a fresh process that starts its own local Ray
  warm  - `farm train` on the farm that `farm up` started (Ray already running)
and prints wall times, the fixed overhead (farm wall - bare wall) and the training tokens/s ratio.
Writes bench/results/train_overhead.json.

    python bench/train_overhead.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

BARE = r'''
import json, sys, time
t_start = time.time()
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_scheduler
from farm.manifest import load_manifest
from farm.train.data import Collator, prepare_data

m = load_manifest(sys.argv[1])
t = m.training
torch.manual_seed(t.seed)
torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
tok = AutoTokenizer.from_pretrained(m.base_model)
data = prepare_data(m.dataset, task="causal_lm", tokenizer=tok, max_seq_len=t.max_seq_len, seed=t.seed)
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(m.base_model, quantization_config=bnb, dtype=torch.float32,
                                             device_map={"": "cpu"})
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
model = get_peft_model(model, LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                         target_modules="all-linear", modules_to_save=m.lora.modules_to_save,
                                         task_type="CAUSAL_LM"))
for mod in model.modules():  # the AVX512-BF16 repack trap (see farm.modeling.disable_cpu_repack)
    if hasattr(mod, "support_avx512bf16_for_cpu"):
        mod.support_avx512bf16_for_cpu = False
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=t.learning_rate)
sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=int(t.warmup_ratio * t.max_steps + 0.999),
                      num_training_steps=t.max_steps)
collate = Collator(tok.pad_token_id)
rows = data.train
g = torch.Generator().manual_seed(t.seed)
order = []
tokens, train_s = 0, 0.0
model.train()
for step in range(t.max_steps):
    if len(order) < t.batch_size:
        order += torch.randperm(len(rows), generator=g).tolist()
    idx, order = order[: t.batch_size], order[t.batch_size :]
    t0 = time.perf_counter()  # like the farm's step time: batch assembly + forward/backward/step
    batch = collate([rows[i] for i in idx])
    out = model(**batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    train_s += time.perf_counter() - t0
    tokens += int(batch["attention_mask"].sum())
print(json.dumps({"tokens": tokens, "train_seconds": train_s, "loss": float(out.loss),
                  "in_process_wall": time.time() - t_start}))
'''


def _manifest(tmp: Path, steps: int) -> Path:
    """customer_x's job with a fixed step count, no mid-run eval/checkpoints (pure training cost)."""
    import yaml

    raw = yaml.safe_load((REPO / "jobs" / "customer_x.yaml").read_text())
    raw["base_model"] = str(REPO / "models" / "tiny-llama")
    for key in ("train", "eval"):
        raw["dataset"][key] = str((REPO / "jobs" / raw["dataset"][key]).resolve())
    raw["training"].update({"max_steps": steps, "eval_every": None, "checkpoint_every": None})
    raw["resources"] = {"gpus": 0, "max_failures": 0}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _farm_train(manifest: Path, env: dict) -> dict:
    farm = str(Path(sys.executable).with_name("farm"))
    wall, out = _timed([farm, "train", str(manifest), "--json"], env)
    meta = json.loads(out)["metadata"]
    return {"wall": wall, "tokens": meta["tokens_trained"], "train_seconds": meta["worker_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    if not (REPO / "models" / "tiny-llama").exists():
        sys.exit("models/tiny-llama is missing: run `make models` first")

    tmp = Path(tempfile.mkdtemp(prefix="farm-bench-train-"))
    manifest = _manifest(tmp, args.steps)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    base_env.pop("RAY_ADDRESS", None)
    results: dict = {"steps": args.steps, "machine": f"{os.cpu_count()} CPUs, no GPU" if not shutil.which("nvidia-smi") else "GPU"}
    try:
        wall, out = _timed([sys.executable, "-c", BARE, str(manifest)], base_env)
        bare = json.loads(out.strip().splitlines()[-1])
        results["bare"] = {"wall": wall, "tokens": bare["tokens"], "train_seconds": bare["train_seconds"]}

        env = {**base_env, "FARM_HOME": str(tmp / "cold")}
        results["farm_cold"] = _farm_train(manifest, env)

        # A running cluster, as after `farm up`: Ray start-up is paid once, not per job.
        env = {**base_env, "FARM_HOME": str(tmp / "warm")}
        farm = str(Path(sys.executable).with_name("farm"))
        subprocess.run([farm, "up"], env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            results["farm_warm"] = _farm_train(manifest, env)
        finally:
            subprocess.run([farm, "down"], env=env, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    b = results["bare"]
    b_tps = b["tokens"] / b["train_seconds"]
    print(f"{'run':<11}{'wall s':>9}{'overhead s':>12}{'train tok/s':>13}{'tok/s ratio':>13}")
    print(f"{'bare':<11}{b['wall']:>9.1f}{'-':>12}{b_tps:>13.0f}{1.0:>13.2f}")
    for name in ("farm_cold", "farm_warm"):
        r = results[name]
        tps = r["tokens"] / r["train_seconds"]
        r["overhead_seconds"] = r["wall"] - b["wall"]
        r["tokens_per_s_ratio"] = tps / b_tps
        r["wall_ratio"] = r["wall"] / b["wall"]
        print(f"{name:<11}{r['wall']:>9.1f}{r['overhead_seconds']:>12.1f}{tps:>13.0f}{r['tokens_per_s_ratio']:>13.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
