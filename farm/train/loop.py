"""The Ray Train worker: load the base (quantized), attach LoRA, train, evaluate, checkpoint.

Runs inside a Ray Train worker process; gets plain arguments (see farm.train.run.loop_config), never
a manifest, and reads and tokenizes the job's data itself (farm.train.data.load_worker_data).
Checkpoints (farm.train.checkpoint) hold everything needed to resume exactly: adapter weights,
optimizer, scheduler, RNG state, the data position and the best weights so far, so a restarted
worker ends at the planned step count and early stopping still publishes the best weights.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from farm.train import checkpoint as ckpt_io
from farm.train.step import to_device as _to_device
from farm.train.step import train_step

# Kept for callers that import them from here.
STATE_FILE, FINAL_MARKER = ckpt_io.STATE_FILE, ckpt_io.FINAL_MARKER
# Each ray.train.report waits for the Train controller's next poll of the worker, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (farm.settings.Settings.train_poll_s): reporting every step of a
# fast job would cost a poll a step. So the worker reports to Ray Train once per REPORT_INTERVAL_S
# plus at every eval, checkpoint and the end, and every step goes to the farm's progress channel (a
# ~1 ms actor call) and the metrics history.
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


def build_base(model_cfg: dict, device: str):
    """The frozen quantized base, prepared for k-bit training (packs share it). Returns (model, footprint)."""
    from peft import prepare_model_for_kbit_training

    from farm.modeling import Quantization, load_base_model

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
    return base, footprint


def build_model(model_cfg: dict, lora_config, device: str):
    """Quantized base + PEFT LoRA, ready to train. Returns (peft_model, info)."""
    from peft import get_peft_model

    from farm.modeling import disable_cpu_repack

    base, footprint = build_base(model_cfg, device)
    model = get_peft_model(base, lora_config)
    if device == "cpu":
        disable_cpu_repack(model)
    trainable, total = model.get_nb_trainable_parameters()
    return model, {"params_trainable": trainable, "params_total": total, "base_footprint_bytes": footprint}


def evaluate(model, rows: dict, collate, batch_size: int, device, task: str) -> dict:
    """Mean eval loss (token-weighted for causal LM), the share of answer tokens predicted exactly
    (greedy, causal LM: OpenAI's mean token accuracy) and accuracy for classification."""
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
                target = batch["labels"][:, 1:]
                scored = target != -100
                w = int(scored.sum())
                correct += int(((out.logits[:, :-1].argmax(-1) == target) & scored).sum())
                seen += w
            total_loss += float(out.loss) * w
            total_weight += w
    model.train()
    metrics = {"eval_loss": total_loss / max(total_weight, 1)}
    key = "eval_accuracy" if task == "seq_cls" else "eval_mean_token_accuracy"
    metrics[key] = correct / max(seen, 1)
    return metrics


def token_logprobs(model, rows: dict, count: int, device) -> list[dict]:
    """Per-token logprobs of the first `count` rows as the trained model scores them (each token given
    the ones before it, as an echo request does): the training side of the train/serve parity check."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for j in range(min(count, len(rows["input_ids"]))):
            ids = list(rows["input_ids"][j])
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
            out.append({"input_ids": ids, "logprobs": [float(v) for v in lp]})
    model.train()
    return out


def evaluate_baseline(model, baseline: dict, rows: dict, collate, batch_size: int, device, task: str) -> dict:
    """The version an alias points at ({"catalog": url, "ref": ...}), scored on this job's eval rows: its adapter
    fetched (hashes verified), loaded beside the trained one on the same base, evaluated, removed.
    {"baseline_error": why} when it cannot be (another base shape, a deleted version)."""
    from farm.catalog import Catalog

    try:
        path = str(Catalog(baseline["catalog"]).fetch(baseline["ref"]))
        model.load_adapter(path, adapter_name="farm_baseline", is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - a baseline that does not fit this base is no comparison
        return {"baseline_error": f"{type(exc).__name__}: {exc}"}
    try:
        model.set_adapter("farm_baseline")
        return {"baseline_" + k: v for k, v in evaluate(model, rows, collate, batch_size, device, task).items()}
    finally:
        model.set_adapter("default")
        model.delete_adapter("farm_baseline")


def _save_checkpoint(model, optimizer, scheduler, state: dict, final: bool, best_weights: dict | None = None):
    """Write a checkpoint into a temp folder and return a Ray Train Checkpoint of it (Ray Train
    deletes the folder once it has uploaded it: see `emit`)."""
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="farm-ckpt-")
    ckpt_io.write(tmp, model, optimizer, scheduler, state, final=final, best_weights=best_weights)
    return Checkpoint.from_directory(tmp)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one worker per job)."""
    import ray
    import ray.train
    import torch
    from transformers import get_scheduler

    from farm.train.data import Collator, load_worker_data

    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        # Ray pins OMP threads to the worker's logical CPUs; a CPU-only job should use the cores it has.
        torch.set_num_threads(config.get("cpu_threads") or len(os.sched_getaffinity(0)))
    opt = config["optim"]
    task = config["model"]["task"]
    _seed_all(opt["seed"])
    # The worker reads and tokenizes its own data (the driver only checked it, keeping counts).
    data = load_worker_data(config["data"])
    train_rows, eval_rows = data.train, data.eval

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
    collate = Collator(config["pad_token_id"])
    n_train = len(train_rows["input_ids"])
    bs, accum = opt["batch_size"], opt["grad_accum"]

    state = {
        "step": 0, "epoch": 0, "batch_index": 0, "tokens": 0, "history": [],
        "best_eval": None, "best_step": None, "bad_evals": 0, "train_seconds": 0.0, "stopped_early": False,
    }
    resumed_from, best_weights = None, None
    identity = config.get("identity")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored, best_weights = ckpt_io.restore(d, model, optimizer, scheduler, identity)
        state.update(restored)
        resumed_from = state["step"]
    if identity:
        state["identity"] = identity
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
            # The temp farm-ckpt-* folder is deleted once Ray Train has copied it to run storage.
            ray.train.report(metrics, checkpoint=ckpt,
                             delete_local_checkpoint_after_upload=True if ckpt is not None else None)
            last_report[0] = time.monotonic()

    model.train()
    epoch_batches = _batches_for_epoch(n_train, bs, opt["seed"], state["epoch"])
    eval_every, ckpt_every = opt.get("eval_every"), opt.get("checkpoint_every")
    patience = opt.get("early_stopping_patience")

    def micro_batches():
        for _ in range(accum):
            if state["batch_index"] >= len(epoch_batches):
                state["epoch"] += 1
                state["batch_index"] = 0
                epoch_batches[:] = _batches_for_epoch(n_train, bs, opt["seed"], state["epoch"])
            idx = epoch_batches[state["batch_index"]]
            state["batch_index"] += 1
            yield collate([{k: train_rows[k][j] for k in train_rows} for j in idx])

    while not final_already and state["step"] < total_steps and not state["stopped_early"]:
        res = train_step(model, optimizer, params, micro_batches(), device=device,
                         max_grad_norm=opt["max_grad_norm"], scheduler=scheduler)
        dt = res.seconds
        state["step"] += 1
        state["tokens"] += res.tokens
        state["train_seconds"] += dt
        metrics = {
            "step": state["step"], "total_steps": total_steps, "epoch": state["epoch"],
            "loss": res.loss, "learning_rate": scheduler.get_last_lr()[0],
            "tokens": state["tokens"], "tokens_per_s": res.tokens / dt if dt > 0 else 0.0,
            "train_seconds": state["train_seconds"],
            "step_tokens": res.tokens, "step_seconds": dt,  # this step alone: per-attempt cost
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
            ckpt = _save_checkpoint(model, optimizer, scheduler, state, final=False, best_weights=best_weights)
        emit(metrics, ckpt)

    if not final_already:
        if state["stopped_early"] and best_weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, best_weights)
        final = evaluate(model, eval_rows, collate, bs, device, task)
        if config.get("baseline_adapter"):
            final.update(evaluate_baseline(model, config["baseline_adapter"], eval_rows, collate, bs, device, task))
        if task == "causal_lm" and config.get("parity_rows"):
            state["parity_rows"] = token_logprobs(model, eval_rows, config["parity_rows"], device)
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
