"""Packed LoRA steps vs one job at a time, on the same tiny NF4 Llama, data and step count.

For K = 1, 2, 4, 8 jobs (each: all-linear LoRA r=8, a micro-batch of --batch rows of --seq tokens):
  sequential - K stock PEFT models (today's path: one adapter per model), one training step each,
               one after the other
  packed     - one base with the K jobs' adapters (farm.train.pack_lora), one pack_step for all
and prints aggregate training tokens/s of both and the ratio packed / sequential. The two are timed
in alternating rounds (median of --rounds) so load from other processes hits both alike.
Writes bench/results/pack_step.json.

    python bench/pack_step.py [--ks 1,2,4,8] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from farm.modeling import Quantization, device_kind, disable_cpu_repack, load_base_model
    from farm.tiny import build_all
    from farm.train.pack_lora import PackLoRA
    from farm.train.pack_step import JobTrainer, pack_step

    device = device_kind()
    models = build_all(Path(tempfile.mkdtemp(prefix="farm-bench-pack-")), sorted((REPO / "jobs" / "data").glob("*.jsonl")))
    src = str(models["llama"])

    def base():
        b = load_base_model(src, quant=Quantization(), device=device)
        return prepare_model_for_kbit_training(b, use_gradient_checkpointing=False)

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(5, 600, (args.batch, args.seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    results = []
    for k in [int(x) for x in args.ks.split(",")]:
        data = [batch() for _ in range(k)]
        dev = [{n: t.to(device) for n, t in b.items()} for b in data]
        tokens_per_step = sum(int(b["attention_mask"].sum()) for b in data)

        singles = []
        for i in range(k):
            torch.manual_seed(i)
            m = get_peft_model(base(), copy.deepcopy(cfg))
            disable_cpu_repack(m)
            m.train()
            params = [p for p in m.parameters() if p.requires_grad]
            singles.append((m, params, torch.optim.AdamW(params, lr=1e-4)))

        model = base()
        model.train()
        pack = PackLoRA(model)
        trainers = {}
        for i in range(k):
            params = pack.add_job(f"j{i}", cfg, seed=i)
            opt = torch.optim.AdamW(params, lr=1e-4)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
            trainers[f"j{i}"] = JobTrainer(f"j{i}", params, opt, sched, seed=i)
        micro = {f"j{i}": data[i] for i in range(k)}

        # Defaults bind this round's models: the closures must not see the next round's (or deleted) names.
        def seq_step(singles=singles, dev=dev):
            for (m, params, opt), b in zip(singles, dev):
                m(**b).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

        def packed_step(model=model, pack=pack, trainers=trainers, micro=micro):
            pack_step(model, pack, trainers, micro, 0, device=device)

        def timed(fn) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        seq_step(), packed_step()  # warm-up
        seq_t, pack_t = [], []
        for _ in range(args.rounds):
            seq_t.append(timed(seq_step))
            pack_t.append(timed(packed_step))
        seq_tps = tokens_per_step * args.steps / statistics.median(seq_t)
        pack_tps = tokens_per_step * args.steps / statistics.median(pack_t)
        row = {"k": k, "tokens_per_step": tokens_per_step, "sequential_tokens_per_s": round(seq_tps, 1),
               "packed_tokens_per_s": round(pack_tps, 1), "ratio": round(pack_tps / seq_tps, 3)}
        results.append(row)
        print(f"K={k}: sequential {seq_tps:8.0f} tok/s   packed {pack_tps:8.0f} tok/s   ratio {pack_tps / seq_tps:.2f}x",
              flush=True)
        del singles, model, pack, trainers, seq_step, packed_step

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"device": device, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "rounds": args.rounds, "results": results}
    (RESULTS / "pack_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
