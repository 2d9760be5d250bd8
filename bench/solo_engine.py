"""A solo job through the training engine (a pack of one) vs the whole-PEFT-model path, same job.

Both paths are what the Ray Train worker runs (farm.train.loop): `engine` is farm.train.engine with
one member, `peft` is farm.modeling's NF4 base + get_peft_model + farm.train.step.train_step. The
same base, LoRA config, rows, batch size, accumulation, optimizer and seed. Each run loads the base,
trains `--steps` optimizer steps and prints the median seconds per step (after `--warmup` steps).

One path per process, so that farm-bench can time them side by side, paired (A B A B ...):

    farm-bench -n 5 --timeout 1200 -- .venv/bin/python bench/solo_engine.py --path engine \\
        --vs '.venv/bin/python bench/solo_engine.py --path peft'

or both in one process, alternating, printing the ratio engine/peft of the median step time (and
writing bench/results/solo_engine.json; `make bench` runs it on the real model):

    .venv/bin/python bench/solo_engine.py --path both [--base models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(n: int, length: int, vocab: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        ln = length - (i % 4) * (length // 8)  # a little spread, as real rows have
        ids = torch.randint(5, vocab, (ln,), generator=g).tolist()
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * ln)
        cols["labels"].append([-100] * (ln // 2) + ids[ln // 2:])
    return cols


def _spec(args):
    from peft import LoraConfig

    from farm.train.spec import MemberSpec, OptimSpec

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
                      modules_to_save=args.modules_to_save or None)
    optim = OptimSpec(optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0,
                      lr_scheduler="linear", warmup_ratio=0.0, batch_size=args.batch_size, grad_accum=1, seed=0,
                      total_steps=args.steps + args.warmup)
    return MemberSpec(job_id="solo", lora=lora, optim=optim, pad_token_id=0)


def _base(path: str):
    from farm.train.modelops import build_base

    return build_base({"source": path, "revision": None, "task": "causal_lm",
                       "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "auto"}}, "cpu")


def run_engine(args, rows) -> list[float]:
    import torch

    from farm.train.engine import Engine

    torch.manual_seed(0)
    base, footprint = _base(args.base)
    engine = Engine(base, torch.device("cpu"), footprint=footprint)
    m = engine.admit(_spec(args), rows, rows)
    times = []
    for _ in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        (up,) = engine.step()
        times.append(time.perf_counter() - t0)
        assert up.failed is None and up.metrics is not None
    del m
    return times[args.warmup:]


def run_peft(args, rows) -> list[float]:
    import torch
    from transformers import get_scheduler

    from farm.train.data import Collator
    from farm.train.modelops import make_optimizer, peft_model
    from farm.train.schedule import batches_for_epoch, new_state, next_batch
    from farm.train.step import train_step

    torch.manual_seed(0)
    spec = _spec(args)
    base, footprint = _base(args.base)
    model, _ = peft_model(base, footprint, spec.lora, "cpu")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = make_optimizer("adamw", params, 1e-4, 0.0, "cpu")
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=spec.optim.total_steps)
    collate, state = Collator(0), new_state()
    n = len(rows["input_ids"])
    batches = batches_for_epoch(n, spec.optim.batch_size, 0, 0)
    times = []
    for _ in range(args.steps + args.warmup):
        idx = next_batch(state, batches, n, spec.optim)
        micro = [collate([{k: rows[k][j] for k in rows} for j in idx])]
        t0 = time.perf_counter()
        train_step(model, opt, params, micro, device=torch.device("cpu"), max_grad_norm=1.0, scheduler=sched)
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", choices=["engine", "peft", "both"], default="both")
    p.add_argument("--base", default=str(REPO / "models" / "tiny-llama"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="with --path both: engine/peft runs each, alternating")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modules-to-save", nargs="*", default=[], metavar="MODULE",
                   help="also train full copies of these modules (lora.modules_to_save), e.g. lm_head")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.base).vocab_size
    rows = _rows(64, args.seq_len, vocab, seed=1)
    paths = ["engine", "peft"] * args.rounds if args.path == "both" else [args.path]
    medians: dict[str, list[float]] = {"engine": [], "peft": []}
    for path in paths:
        times = run_engine(args, rows) if path == "engine" else run_peft(args, rows)
        med = statistics.median(times)
        medians[path].append(med)
        print(f"{path}: median {med * 1000:.1f} ms/step over {len(times)} steps", flush=True)
    if args.path == "both":
        ratios = [e / q for e, q in zip(medians["engine"], medians["peft"])]
        out = {"base": args.base, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "rank": args.rank, "modules_to_save": args.modules_to_save, "engine_ms": [round(v * 1000, 1) for v in medians["engine"]],
               "peft_ms": [round(v * 1000, 1) for v in medians["peft"]],
               "ratio_engine_over_peft": round(statistics.median(ratios), 3)}
        print(json.dumps(out))
        results = REPO / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "solo_engine.json").write_text(json.dumps(out, indent=2))
        print(f"engine / peft step time: x{out['ratio_engine_over_peft']} (goal <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
