"""Preference tuning on a real model: DPO vs SFT on the same MR rows, SmolLM2-135M-Instruct (NF4), CPU.

The data and split are bench/quality.py's (MR sentence polarity, fetched at run time, never
committed; 200 balanced held-out rows, seed 0). Each training row becomes a preference pair: the prompt
is quality.py's chat prompt (system: classify the review; user: the sentence), `chosen` the correct
label word as the assistant's answer, `rejected` the other label. Why this construction: it is the
question quality.py scores, so the numbers line up, and the two responses differ only in the
decision, so a preference can only be learned by getting the decision right (a "reason" template
would add tokens both sides share and that DPO's log-ratios cancel anyway). SFT trains on the same
rows as chat examples (prompt + chosen).

Both train on the training engine in-process (farm.train.engine: the same code path the pack and
solo workers run, without Ray's ~20 s per run), same LoRA, steps, batch and seed, and are scored on
the held-out pairs next to the base:
  * label accuracy: the model gives the correct label a higher log-probability than the wrong one;
  * greedy exact match: greedy decoding answers exactly the label and ends its turn (every response
    token, end of turn included, is the top-1 token at its position);
  * reward accuracy (DPO's metric): beta x (log-ratio to the base) of the correct answer exceeds the
    wrong one's; 0 for the base by definition (both ratios are 0);
  * train seconds on this box (DPO's include its reference pass: `admit_seconds`).

Defaults are bench/quality.py's SFT settings (60 steps x 8, lr 1e-3, r 8 on q/k/v/o): one epoch.

    .venv/bin/python bench/dpo.py                 # writes bench/results/dpo.json
    .venv/bin/python bench/dpo.py --steps 2 --eval-rows 20 --train-rows 32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import BASE, LABELS, messages, mr_rows, split  # noqa: E402


def write_data(work: Path, train, test) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)

    def pair(text, y):
        return {"prompt": messages(text), "chosen": [{"role": "assistant", "content": LABELS[y]}],
                "rejected": [{"role": "assistant", "content": LABELS[1 - y]}]}

    files = {"pref_train": [pair(t, y) for t, y in train], "pref_test": [pair(t, y) for t, y in test],
             "sft_train": [{"messages": messages(t, y)} for t, y in train]}
    out = {}
    for name, rows in files.items():
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def score(engine, collate, job: str | None, rows: dict, batch: int) -> dict:
    """Label accuracy, greedy exact match and reward accuracy of the pairs `rows` (DPO columns, with
    the base's reference log-probabilities), under job's adapter (None: the base alone)."""
    import torch

    from farm.train.methods import DPO, sequence_logps

    method = DPO()
    n = len(rows["input_ids"])
    label_ok = exact = reward_ok = 0
    engine.model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            idx = list(range(i, min(n, i + batch)))
            b = method.micro_batch(rows, idx, collate)
            with engine.pack.rows({job: slice(None)} if job else {}):
                logits = engine.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            logps = sequence_logps(logits, b["labels"])
            c, r = logps.chunk(2)
            label_ok += int((c > r).sum())
            reward_ok += int(((c - b["ref_chosen_logps"]) > (r - b["ref_rejected_logps"])).sum())
            target = b["labels"][: len(idx), 1:]  # the chosen rows: prompt -100, then the answer
            top1 = logits[: len(idx), :-1].argmax(-1)
            scored = target != -100
            exact += int(((top1 == target) | ~scored).all(dim=1).sum())
    engine.model.train()
    return {"label_accuracy": label_ok / n, "exact_match": exact / n, "reward_accuracy": reward_ok / n}


def reference_cost(engine, collate, rows: dict, batch: int, repeats: int = 3) -> dict:
    """Seconds of one no-grad forward of a micro-batch of pairs (what scoring the reference costs, per
    pair and pass) against one training forward + backward of the same batch under a LoRA: the
    trade-off between scoring the reference once before training and scoring it in every step."""
    import torch
    from peft import LoraConfig

    from farm.train.methods import DPO

    b = DPO().micro_batch(rows, list(range(batch)), collate)
    engine.pack.add_job("timing", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), seed=0)
    out = {}
    try:
        for name, grad in (("no_grad_forward_s", False), ("train_forward_backward_s", True)):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                with torch.set_grad_enabled(grad), engine.pack.rows({"timing": slice(None)} if grad else {},
                                                                    dropout_seeds={"timing": 0}):
                    logits = engine.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                          use_cache=False).logits
                    if grad:
                        logits.float().logsumexp(-1).mean().backward()
                times.append(time.perf_counter() - t)
            out[name] = sorted(times)[len(times) // 2]
    finally:
        engine.pack.remove_job("timing")
    out["sequences"] = int(b["input_ids"].shape[0])
    out["ratio"] = out["no_grad_forward_s"] / out["train_forward_backward_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs (DPO) / examples (SFT) per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--train-rows", type=int, default=480, help="training rows used (steps x batch: one epoch)")
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dpo.json")
    ap.add_argument("--only-reference-cost", action="store_true", help="just time the reference pass vs a step")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig

    from farm.manifest import DatasetSpec
    from farm.modeling import load_tokenizer
    from farm.realmodel import cache_dir
    from farm.train.data import Collator, load_prepared
    from farm.train.engine import Engine
    from farm.train.methods import DPO
    from farm.train.modelops import build_base
    from farm.train.spec import MemberSpec, OptimSpec

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()
    train, test = split(mr_rows(), 200, seed=0)
    train = train[: args.train_rows]
    test = [r for r in test if r[1] == 0][: args.eval_rows // 2] + [r for r in test if r[1] == 1][: args.eval_rows - args.eval_rows // 2]
    files = write_data(cache_dir() / "bench" / "dpo", train, test)
    tok = load_tokenizer(str(BASE), None)
    collate = Collator(tok.pad_token_id)
    common = {"task": "causal_lm", "max_seq_len": 160, "seed": 0}
    pref = load_prepared(DatasetSpec(train=str(files["pref_train"]), eval=str(files["pref_test"])), tok,
                         method="dpo", **common)
    sft = load_prepared(DatasetSpec(train=str(files["sft_train"]), eval=str(files["sft_train"])), tok, **common)
    print(f"MR: {len(train)} training rows, {len(test)} held-out pairs (balanced)")

    model, footprint = build_base({"source": str(BASE), "revision": None, "task": "causal_lm",
                                   "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "auto"}}, "cpu")
    engine = Engine(model, torch.device("cpu"), footprint=footprint, base_source=str(BASE))
    with engine.pack.rows({}):  # the base's log-probabilities of the held-out pairs: the reference
        test_rows = DPO().prepare(engine.model, pref.eval, collate, args.batch_size, torch.device("cpu"))
    engine.model.train()
    cost = reference_cost(engine, collate, test_rows, args.batch_size)
    print("reference pass vs training step, one micro-batch:", cost, flush=True)
    if args.only_reference_cost:
        return
    results = {"base": score(engine, collate, None, test_rows, args.batch_size)}
    print("base", results["base"])

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=args.targets.split(","),
                      task_type="CAUSAL_LM")
    runs = {"dpo": (pref, {"beta": args.beta}), "sft": (sft, None)}
    timings = {}
    for name, (data, options) in runs.items():
        optim = OptimSpec(optimizer="adamw", learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0,
                          lr_scheduler="linear", warmup_ratio=0.1, batch_size=args.batch_size, grad_accum=1, seed=0,
                          total_steps=args.steps)
        spec = MemberSpec(job_id=name, lora=lora, optim=optim, pad_token_id=tok.pad_token_id,
                          method="dpo" if options else "sft", method_options=options)
        t0 = time.perf_counter()
        engine.admit(spec, data.train, {k: v[:8] for k, v in data.eval.items()})
        admit_s = time.perf_counter() - t0  # DPO: the reference pass over every pair (no adapter), once
        losses, done = [], False
        while not done:
            for up in engine.step():
                assert up.failed is None, up.failed
                losses.append(up.metrics["loss"])
                done = up.done
        timings[name] = time.perf_counter() - t0
        results[name] = {**score(engine, collate, name, test_rows, args.batch_size), "train_seconds": timings[name],
                         "admit_seconds": admit_s,
                         "first_loss": losses[0], "last_loss": losses[-1]}
        print(name, results[name], flush=True)
        engine.release(name)

    print("\n| model | label accuracy | greedy exact match | reward accuracy | train s |\n|---|---|---|---|---|")
    for name in ("base", "sft", "dpo"):
        r = results[name]
        print(f"| {name} | {r['label_accuracy']:.3f} | {r['exact_match']:.3f} | {r['reward_accuracy']:.3f} | "
              f"{r.get('train_seconds', 0):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": args.beta, "rank": args.rank,
        "targets": args.targets, "train_rows": len(train), "eval_rows": len(test), "results": results,
        "reference_cost": cost,
        "wall_seconds": time.time() - started, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
