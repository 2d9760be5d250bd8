"""The Ray Train worker: load the base (quantized), attach LoRA, train, evaluate, checkpoint.

Runs inside a Ray Train worker process; gets plain arguments (see farm.train.run.build_loop_config),
never a manifest. Checkpoints hold everything needed to resume exactly: adapter weights, optimizer,
scheduler, RNG state and the data position, so a restarted worker ends at the planned step count.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.pt"
FINAL_MARKER = "FINAL"
# Each ray.train.report waits for the Train controller's next poll of the worker, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s): reporting every step of a fast job costs 2 s a
# step (measured: 30 reports took 58 s). So the worker reports to Ray Train once per
# REPORT_INTERVAL_S plus at every eval, checkpoint and the end, and every step goes to the farm's
# progress channel (a ~1 ms actor call) and the metrics history. Farm runs poll every 1 s unless the
# operator chose otherwise (the driver imports this module before it builds the trainer; Ray Train
# passes the variable on to its controller): 0.2 s polls cost a 2-core box ~40% of its step time.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
REPORT_INTERVAL_S = 5.0


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _batches_for_epoch(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled batches for an epoch (so a resumed run sees the same order)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def _make_optimizer(name: str, params, lr: float, weight_decay: float, device: str):
    import torch

    if name == "auto":
        name = "paged_adamw_8bit" if device == "cuda" else "adamw"
    if name in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay), name
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9), name
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def build_model(model_cfg: dict, lora_config, device: str):
    """Quantized base + PEFT LoRA, ready to train. Returns (peft_model, info)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from farm.modeling import Quantization, disable_cpu_repack, load_base_model

    quant = Quantization(**model_cfg["quant"])
    base = load_base_model(
        model_cfg["source"],
        revision=model_cfg.get("revision"),
        task=model_cfg["task"],
        num_labels=model_cfg.get("num_labels"),
        id2label=model_cfg.get("id2label"),
        quant=quant,
        device=device,
    )
    footprint = base.get_memory_footprint()
    if quant.mode != "none":
        # Gradient checkpointing trades compute for memory; worth it on GPU, only slows CPU runs.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=device == "cuda")
    model = get_peft_model(base, lora_config)
    if device == "cpu":
        disable_cpu_repack(model)
    trainable, total = model.get_nb_trainable_parameters()
    return model, {"params_trainable": trainable, "params_total": total, "base_footprint_bytes": footprint}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(model, rows: dict, collate, batch_size: int, device, task: str) -> dict:
    """Mean eval loss (token-weighted for causal LM) and accuracy for classification."""
    import torch

    model.eval()
    total_loss, total_weight, correct, seen = 0.0, 0, 0, 0
    n = len(rows["input_ids"])
    with torch.no_grad():
        for i in range(0, n, batch_size):
            feats = [{k: rows[k][j] for k in rows} for j in range(i, min(n, i + batch_size))]
            batch = _to_device(collate(feats), device)
            out = model(**batch)
            if task == "seq_cls":
                w = batch["labels"].shape[0]
                pred = out.logits.argmax(-1)
                correct += int((pred == batch["labels"]).sum())
                seen += w
            else:
                w = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * w
            total_weight += w
    model.train()
    metrics = {"eval_loss": total_loss / max(total_weight, 1)}
    if task == "seq_cls":
        metrics["eval_accuracy"] = correct / max(seen, 1)
    return metrics


def _save_checkpoint(model, optimizer, scheduler, state: dict, final: bool):
    """Write adapter + trainer state into a temp dir and return a Ray Train Checkpoint of it."""
    import torch
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="farm-ckpt-")
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(
        {
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        Path(tmp) / STATE_FILE,
    )
    if final:
        (Path(tmp) / FINAL_MARKER).touch()
    return Checkpoint.from_directory(tmp)


def _restore(checkpoint, model, optimizer, scheduler) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        weights = load_file(str(Path(d) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        state["final"] = (Path(d) / FINAL_MARKER).exists()
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(state.pop("torch_rng"))
    cuda_rng = state.pop("cuda_rng", None)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one worker per job)."""
    import ray
    import ray.train
    import torch
    from transformers import get_scheduler

    from farm.train.data import Collator

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        # Ray pins OMP threads to the worker's logical CPUs; a CPU-only job should use the cores it has.
        torch.set_num_threads(config.get("cpu_threads") or len(os.sched_getaffinity(0)))
    opt = config["optim"]
    task = config["model"]["task"]
    _seed_all(opt["seed"])

    model, info = build_model(config["model"], config["lora"], kind)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = _make_optimizer(opt["optimizer"], params, opt["learning_rate"], opt["weight_decay"], kind)
    total_steps = opt["total_steps"]
    scheduler = get_scheduler(
        opt["lr_scheduler"],
        optimizer,
        num_warmup_steps=int(math.ceil(opt["warmup_ratio"] * total_steps)),
        num_training_steps=total_steps,
    )
    train_rows, eval_rows = ray.get(config["data"])
    collate = Collator(config["pad_token_id"])
    n_train = len(train_rows["input_ids"])
    bs, accum = opt["batch_size"], opt["grad_accum"]

    state = {
        "step": 0, "epoch": 0, "batch_index": 0, "tokens": 0, "history": [],
        "best_eval": None, "best_step": None, "bad_evals": 0, "train_seconds": 0.0, "stopped_early": False,
    }
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state.update(_restore(checkpoint, model, optimizer, scheduler))
        resumed_from = state["step"]
    final_already = state.pop("final", False)
    progress = config.get("progress")
    node_id = ray.get_runtime_context().get_node_id()  # where this worker runs (multi-node placement)

    last_report = [time.monotonic()]

    def emit(metrics: dict, ckpt=None) -> None:
        metrics = {**metrics, "pid": os.getpid(), "node_id": node_id, "device": kind,
                   "attempt_resumed_from": resumed_from}
        if progress is not None:
            try:  # ~1 ms round trip; waiting for it keeps events ordered and none lost at exit
                progress.put_nowait(metrics)
            except Exception:  # noqa: BLE001 - a full/closed progress queue must never stop training
                pass
        now = time.monotonic()
        important = ckpt is not None or "eval_loss" in metrics or metrics.get("final")
        if important or now - last_report[0] >= config.get("report_interval_s", REPORT_INTERVAL_S):
            ray.train.report(metrics, checkpoint=ckpt)
            last_report[0] = time.monotonic()

    model.train()
    epoch_batches = _batches_for_epoch(n_train, bs, opt["seed"], state["epoch"])
    eval_every, ckpt_every = opt.get("eval_every"), opt.get("checkpoint_every")
    patience = opt.get("early_stopping_patience")
    best_weights = None

    while not final_already and state["step"] < total_steps and not state["stopped_early"]:
        t0 = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(accum):
            if state["batch_index"] >= len(epoch_batches):
                state["epoch"] += 1
                state["batch_index"] = 0
                epoch_batches = _batches_for_epoch(n_train, bs, opt["seed"], state["epoch"])
            idx = epoch_batches[state["batch_index"]]
            state["batch_index"] += 1
            batch = _to_device(collate([{k: train_rows[k][j] for k in train_rows} for j in idx]), device)
            out = model(**batch)
            (out.loss / accum).backward()
            step_loss += float(out.loss) / accum
            step_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, opt["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state["step"] += 1
        state["tokens"] += step_tokens
        state["train_seconds"] += dt
        metrics = {
            "step": state["step"], "total_steps": total_steps, "epoch": state["epoch"],
            "loss": step_loss, "learning_rate": scheduler.get_last_lr()[0],
            "tokens": state["tokens"], "tokens_per_s": step_tokens / dt if dt > 0 else 0.0,
            "train_seconds": state["train_seconds"],
            "step_tokens": step_tokens, "step_seconds": dt,  # this step alone: per-attempt cost
        }
        last = state["step"] >= total_steps
        if eval_every and (state["step"] % eval_every == 0) and not last:
            metrics.update(evaluate(model, eval_rows, collate, bs, device, task))
            if state["best_eval"] is None or metrics["eval_loss"] < state["best_eval"]:
                state["best_eval"], state["best_step"], state["bad_evals"] = metrics["eval_loss"], state["step"], 0
                if patience:
                    best_weights = {k: v.detach().clone() for k, v in _adapter_state(model).items()}
            else:
                state["bad_evals"] += 1
                if patience and state["bad_evals"] >= patience:
                    state["stopped_early"] = True
        state["history"].append(metrics)
        ckpt = None
        if ckpt_every and state["step"] % ckpt_every == 0 and not last and not state["stopped_early"]:
            ckpt = _save_checkpoint(model, optimizer, scheduler, state, final=False)
        emit(metrics, ckpt)

    if not final_already:
        if state["stopped_early"] and best_weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, best_weights)
        final = evaluate(model, eval_rows, collate, bs, device, task)
        final.update({
            "step": state["step"], "total_steps": total_steps, "tokens": state["tokens"],
            "train_seconds": state["train_seconds"], "optimizer": opt_name, "stopped_early": state["stopped_early"],
            "final": True, **info,
        })
        state["history"].append(final)
        state["final_metrics"] = final
    final_metrics = state.get("final_metrics", {"final": True})
    emit(final_metrics, _save_checkpoint(model, optimizer, scheduler, state, final=True))


def _adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)
