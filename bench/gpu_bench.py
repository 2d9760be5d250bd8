"""GPU figures for the farm: NF4 QLoRA training vs a plain Hugging Face Trainer + PEFT baseline,
and the NF4 footprint per parameter vs the QLoRA paper. Run by bench/gpu.sh.

The base is a ~0.8B-parameter Llama built from a config (random weights, nothing downloaded),
saved with save_pretrained and loaded back:
  farm      farm.train.loop.build_model (the Ray Train worker's own code: farm.modeling.load_base_model
            in NF4 + double quant, prepare_model_for_kbit_training with gradient checkpointing on
            CUDA, PEFT LoRA) and its optimizer choice for `optimizer: auto` (paged 8-bit AdamW on
            CUDA), driven by the same step as the worker (forward, backward, clip, step). Ray's
            own overhead is bench/train_overhead.py's subject, not this one's.
  baseline  transformers' from_pretrained with a BitsAndBytesConfig, prepare_model_for_kbit_training,
            PEFT, and transformers.Trainer (optim paged_adamw_8bit, gradient checkpointing, bf16).
Both: same LoRA (r=16 on all linear layers), batch, sequence length, random token data and steps.
Tokens/s is timed over the steps after the warm-up; peak memory is torch.cuda.max_memory_allocated.

    python bench/gpu_bench.py                 # on an NVIDIA GPU; writes bench/results/gpu.json
    python bench/gpu_bench.py --cpu-smoke     # tiny config, a few steps, CPU-safe parts only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QLORA_BITS_DOUBLE_QUANT = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: NF4 + 8-bit absmax per 64 + fp32 per 256 blocks
QLORA_BITS_SINGLE_QUANT = 4 + 32 / 64  # 4.5: NF4 + fp32 absmax per block of 64

BENCH_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                   vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
SERVE_SKIPPED = ("measured separately: bench/gpu.sh runs bench/serve.py --gpu --engines-only after this script "
                 "(farm vs vLLM engine, 1 and 32 adapters, 32 clients) into bench/results/gpu_serve.json.")


def build_base(dest: Path, layers: int, smoke: bool) -> int:
    """Save a random-weight Llama (bf16 on disk) to dest; return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **(SMOKE_MODEL if smoke else BENCH_MODEL))
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest, safe_serialization=True)
    del model
    gc.collect()
    return n


def lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none",
                      task_type=TaskType.CAUSAL_LM)


def batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def nf4_footprint(model) -> dict:
    """Bits per parameter of the 4-bit linear layers, next to the QLoRA paper's figures, and the whole
    model's get_memory_footprint(). `bits_per_param_blockwise` counts the packed weights and the
    per-block constants (what the paper's 4.127 counts); `bits_per_param` adds each layer's fixed
    lookup tables, which only matter for tiny layers."""
    import bitsandbytes as bnb
    import torch

    def tensor_bytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    params = weight_bytes = block_bytes = table_bytes = layers = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        layers += 1
        params += module.in_features * module.out_features
        weight_bytes += tensor_bytes(module.weight.data)
        qs = module.weight.quant_state
        # Per block: the absmax constants (and with double quant, theirs); per layer: lookup tables.
        block_bytes += tensor_bytes(qs.absmax)
        table_bytes += tensor_bytes(getattr(qs, "code", None)) + tensor_bytes(getattr(qs, "offset", None))
        if getattr(qs, "state2", None) is not None:
            block_bytes += tensor_bytes(qs.state2.absmax)
            table_bytes += tensor_bytes(getattr(qs.state2, "code", None))
    if not layers:
        return {"quantized_layers": 0}
    return {
        "quantized_layers": layers,
        "quantized_params": params,
        "weight_bits_per_param": round(8 * weight_bytes / params, 4),
        "bits_per_param_blockwise": round(8 * (weight_bytes + block_bytes) / params, 4),
        "bits_per_param": round(8 * (weight_bytes + block_bytes + table_bytes) / params, 4),
        "qlora_paper_bits_double_quant": round(QLORA_BITS_DOUBLE_QUANT, 4),
        "qlora_paper_bits_single_quant": QLORA_BITS_SINGLE_QUANT,
        "model_memory_footprint_bytes": int(model.get_memory_footprint()),
        "all_params": sum(p.numel() for p in model.parameters()),
    }


def _cuda_reset() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def run_farm(path: Path, args, device: str) -> dict:
    """The farm worker's model build + optimizer + step, timed over the post-warm-up steps."""
    from farm.train.modelops import build_model, make_optimizer
    from farm.train.step import train_step

    _cuda_reset()
    t0 = time.perf_counter()
    quant = {"mode": "nf4", "double_quant": True, "compute_dtype": "auto"}
    model, info = build_model({"source": str(path), "task": "causal_lm", "quant": quant}, lora_config(), device)
    load_s = time.perf_counter() - t0
    footprint = nf4_footprint(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer("auto", params, 2e-4, 0.0, device)
    model.train()
    tokens, timed_s = 0, 0.0
    for step, batch in enumerate(batches(args.warmup + args.steps, args.batch_size, args.seq_len, args.vocab)):
        # The worker's own step (farm.train.step): forward, backward, clip, optimizer step.
        res = train_step(model, optimizer, params, [batch], device=device, max_grad_norm=1.0)
        if step >= args.warmup:
            timed_s += res.seconds
            tokens += batch["input_ids"].numel()
    result = {"optimizer": opt_name, "load_s": round(load_s, 2), "steps": args.steps, "tokens": tokens,
              "train_s": round(timed_s, 3), "tokens_per_s": round(tokens / timed_s, 1), "peak_gib": _peak_gib(),
              "final_loss": round(res.loss, 4), "trainable_params": info["params_trainable"],
              "footprint": footprint}
    del model, optimizer
    _cuda_reset()
    return result


def run_packed(path: Path, args, device: str, ks: list[int]) -> dict:
    """Packed training (farm.train.pack_lora + pack_step, the pack worker's step) on one resident base:
    K jobs, each its own LoRA (r=16 all-linear, its own seed), AdamW-family optimizer and batch, one
    forward/backward for all. Aggregate tokens/s over the timed steps and peak memory, per K."""
    from farm.train.modelops import build_base, make_optimizer
    from farm.train.pack_lora import PackLoRA
    from farm.train.pack_step import JobTrainer, pack_step

    rows = []
    for k in ks:
        _cuda_reset()
        quant = {"mode": "nf4", "double_quant": True, "compute_dtype": "auto"}
        model, _ = build_base({"source": str(path), "task": "causal_lm", "quant": quant}, device)
        pack = PackLoRA(model)
        trainers = {}
        for j in range(k):
            job = f"job{j}"
            params = pack.add_job(job, lora_config(), seed=j)
            opt, _ = make_optimizer("auto", params, 2e-4, 0.0, device)
            sched = __import__("torch").optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
            trainers[job] = JobTrainer(job, params, opt, sched, seed=j)
        model.train()
        streams = {job: batches(args.warmup + args.steps, args.batch_size, args.seq_len, args.vocab, seed=i)
                   for i, job in enumerate(trainers)}
        tokens, timed_s = 0, 0.0
        for step in range(args.warmup + args.steps):
            micro = {job: next(streams[job]) for job in trainers}
            if device == "cuda":
                __import__("torch").cuda.synchronize()
            t0 = time.perf_counter()
            pack_step(model, pack, trainers, micro, pad_token_id=0, device=device)
            if device == "cuda":
                __import__("torch").cuda.synchronize()
            if step >= args.warmup:
                timed_s += time.perf_counter() - t0
                tokens += sum(b["input_ids"].numel() for b in micro.values())
        rows.append({"k": k, "tokens": tokens, "train_s": round(timed_s, 3),
                     "tokens_per_s": round(tokens / timed_s, 1), "peak_gib": _peak_gib()})
        del model, pack, trainers
        _cuda_reset()
    out = {"rows": rows}
    peaks = [r["peak_gib"] for r in rows]
    if len(rows) > 1 and None not in peaks:
        out["peak_gib_per_added_job"] = round((peaks[-1] - peaks[0]) / (rows[-1]["k"] - rows[0]["k"]), 3)
    return out


def run_baseline(path: Path, args) -> dict:
    """Plain transformers + PEFT + Trainer, the way a QLoRA notebook sets it up."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    _cuda_reset()
    bf16 = torch.cuda.is_bf16_supported()  # as the farm's compute_dtype: auto
    dtype = torch.bfloat16 if bf16 else torch.float16
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, device_map={"": 0}, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config())
    rows = list(batches(args.warmup + args.steps, args.batch_size, args.seq_len, args.vocab))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows) * args.batch_size

        def __getitem__(self, i):
            b = rows[i // args.batch_size]
            return {k: v[i % args.batch_size] for k, v in b.items()}

    class Timer(TrainerCallback):
        def __init__(self):
            self.start, self.step_s = None, []

        def on_step_begin(self, targs, state, control, **kw):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            torch.cuda.synchronize()
            self.step_s.append(time.perf_counter() - self.start)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=2e-4, optim="paged_adamw_8bit", gradient_checkpointing=True, bf16=bf16, fp16=not bf16,
            lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to=[],
            dataloader_drop_last=True, remove_unused_columns=False, seed=0,
        )
        Trainer(model=model, args=targs, train_dataset=Data(), callbacks=[timer]).train()
    timed = timer.step_s[args.warmup:]
    tokens = len(timed) * args.batch_size * args.seq_len
    result = {"optimizer": "paged_adamw_8bit", "steps": len(timed), "tokens": tokens, "train_s": round(sum(timed), 3),
              "tokens_per_s": round(tokens / sum(timed), 1), "peak_gib": _peak_gib()}
    del model
    _cuda_reset()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="Tiny config, a few steps; GPU-only parts skipped.")
    ap.add_argument("--layers", type=int, default=16, help="Llama layers: 16 = ~0.84B params, 22 = ~1.1B.")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="Timed steps (after --warmup).")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        args.layers, args.seq_len, args.batch_size, args.steps, args.warmup = 2, 32, 2, 3, 1
    elif not cuda:
        print("no CUDA GPU visible: run with --cpu-smoke for the CPU-safe parts", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.cpu_smoke else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    args.vocab = (SMOKE_MODEL if args.cpu_smoke else BENCH_MODEL)["vocab_size"]

    import bitsandbytes
    import peft
    import transformers

    results: dict = {
        "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"gpu": torch.cuda.get_device_name(0) if cuda else None, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "shape": {"layers": args.layers, "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "steps": args.steps, "warmup": args.warmup, "lora": "r=16, alpha=32, all-linear"},
    }
    work = Path(tempfile.mkdtemp(prefix="farm-gpu-bench-"))
    try:
        results["base_params"] = build_base(work / "base", args.layers, args.cpu_smoke)
        print(f"base: Llama, {args.layers} layers, {results['base_params'] / 1e9:.3f}B params ({device})", flush=True)
        results["farm"] = run_farm(work / "base", args, device)
        print(f"farm:     {results['farm']['tokens_per_s']} tokens/s, peak {results['farm']['peak_gib']} GiB", flush=True)
        ks = [1, 2] if args.cpu_smoke else [1, 4, 8]
        results["packed"] = run_packed(work / "base", args, device, ks)
        single = results["farm"]["tokens_per_s"]
        for row in results["packed"]["rows"]:
            row["over_single_tokens_per_s"] = round(row["tokens_per_s"] / single, 3)
            print(f"packed K={row['k']}: {row['tokens_per_s']} tokens/s aggregate "
                  f"(x{row['over_single_tokens_per_s']} the single job), peak {row['peak_gib']} GiB", flush=True)
        if "peak_gib_per_added_job" in results["packed"]:
            print(f"packed: {results['packed']['peak_gib_per_added_job']} GiB peak per added job", flush=True)
        if device == "cuda":
            results["baseline"] = run_baseline(work / "base", args)
            b = results["baseline"]
            print(f"baseline: {b['tokens_per_s']} tokens/s, peak {b['peak_gib']} GiB", flush=True)
            results["farm_over_baseline_tokens_per_s"] = round(results["farm"]["tokens_per_s"] / b["tokens_per_s"], 3)
            results["farm_over_baseline_peak_memory"] = round(results["farm"]["peak_gib"] / b["peak_gib"], 3)
        else:
            results["baseline"] = {"skipped": "needs a CUDA GPU (Trainer with bf16 and paged 8-bit AdamW)"}
            print(f"baseline: skipped ({results['baseline']['skipped']})", flush=True)
        results["serve"] = {"skipped": SERVE_SKIPPED}
        print(f"serve:    skipped ({SERVE_SKIPPED})", flush=True)
        fp = results["farm"]["footprint"]
        if fp.get("quantized_layers"):
            print(f"NF4 footprint: {fp['bits_per_param_blockwise']} bits/param over {fp['quantized_params']:,} quantized params "
                  f"(QLoRA paper: {fp['qlora_paper_bits_double_quant']} with double quant)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
