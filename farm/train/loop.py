"""The Ray Train worker of a job that runs outside a pack, on a whole PEFT model: load the base
(quantized), attach LoRA, train, evaluate, checkpoint. Packs (and the engine's packs of one) run in
farm.train.engine; both shells share the schedule (farm.train.schedule: data order, eval cadence,
early stopping, checkpoint cadence) and the eval and optimizer helpers below.

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
from farm.train.modelops import (
    adapter_state,
    build_base,
    evaluate,
    evaluate_baseline,
    make_optimizer,
    peft_model,
    token_logprobs,
)
from farm.train.schedule import after_step, batches_for_epoch, new_state, next_batch
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


def _save_checkpoint(model, optimizer, scheduler, state: dict, final: bool, best_weights: dict | None = None):
    """A PEFT model's checkpoint (farm.train.checkpoint's layout) as a Ray Train Checkpoint."""
    return _ray_checkpoint(lambda d: ckpt_io.write(d, model, optimizer, scheduler, state, final=final,
                                                   best_weights=best_weights))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one worker per job). A job the training engine can hold (causal LM,
    plain LoRA on Linear layers) trains there as a pack of one; the rest on a whole PEFT model."""
    import ray
    import ray.train
    import torch

    from farm.train.data import load_worker_data

    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        # Ray pins OMP threads to the worker's logical CPUs; a CPU-only job should use the cores it has.
        torch.set_num_threads(config.get("cpu_threads") or len(os.sched_getaffinity(0)))
    _seed_all(config["optim"].seed)
    # The worker reads and tokenizes its own data (the driver only checked it, keeping counts).
    data = load_worker_data(config["data"])
    progress = config.get("progress")
    node_id = ray.get_runtime_context().get_node_id()  # where this worker runs (multi-node placement)
    last_report = [time.monotonic()]
    resumed: list[int | None] = [None]

    def emit(metrics: dict, ckpt=None) -> None:
        metrics = {**metrics, "pid": os.getpid(), "node_id": node_id, "device": kind,
                   "attempt_resumed_from": resumed[0]}
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

    base, footprint = build_base(config["model"], kind)
    problems = _engine_problems(base, config["lora"])
    if config["model"]["task"] == "causal_lm" and not problems:
        _train_on_engine(config, base, footprint, data, device, emit, resumed)
    elif config["member"].method != "sft":
        from farm.errors import TrainingError

        raise TrainingError(f"method {config['member'].method} runs on the training engine, which cannot hold this "
                            f"adapter: {'; '.join(problems) or 'task ' + config['model']['task']}")
    else:
        _train_on_peft(config, base, footprint, data, device, emit, resumed)


def _engine_problems(base, lora) -> list[str]:
    from farm.train.pack_lora import PackLoRA

    return PackLoRA(base).problems(lora)


def _ray_checkpoint(write) -> Any:
    """`write(folder)` into a temp folder, as a Ray Train Checkpoint (deleted once uploaded: see `emit`)."""
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="farm-ckpt-")
    write(tmp)
    return Checkpoint.from_directory(tmp)


def _train_on_engine(config: dict, base, footprint: int, data, device, emit, resumed: list) -> None:
    """The job as a pack of one on the training engine, checkpointed through Ray Train."""
    import ray.train

    from farm.errors import TrainingError
    from farm.train.engine import Engine

    engine = Engine(base, device, footprint=footprint, base_source=config["model"].get("source"),
                    base_revision=config["model"].get("revision"))
    spec = config["member"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            m = engine.admit(spec, data.train, data.eval, resume=d)
        resumed[0] = m.resumed_from
    else:
        m = engine.admit(spec, data.train, data.eval)
    while not m.finished:
        for up in engine.step():
            if up.failed:
                raise TrainingError(up.failed)
            ckpt = None
            if up.done:
                final = engine.finish(m)
                if config.get("baseline_adapter"):
                    final.update(engine.evaluate_baseline(m, config["baseline_adapter"]))
            elif up.checkpoint_due:
                ckpt = _ray_checkpoint(lambda d: engine.write_checkpoint(m, d, final=False))
            metrics = dict(up.metrics)
            metrics.pop("pack_jobs", None)  # alone: no pack to speak of
            emit(metrics, ckpt)
    emit(m.state.get("final_metrics", {"final": True}),
         _ray_checkpoint(lambda d: engine.write_checkpoint(m, d, final=True)))


def _train_on_peft(config: dict, base, footprint: int, data, device, emit, resumed: list) -> None:
    """The job on a whole PEFT model (seq_cls heads, modules_to_save, DoRA, trained biases...)."""
    import ray.train
    from transformers import get_scheduler

    from farm.train.data import Collator

    kind = device.type
    opt = config["optim"]
    task = config["model"]["task"]
    train_rows, eval_rows = data.train, data.eval
    model, info = peft_model(base, footprint, config["lora"], kind)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(opt.optimizer, params, opt.learning_rate, opt.weight_decay, kind)
    total_steps = opt.total_steps
    scheduler = get_scheduler(
        opt.lr_scheduler,
        optimizer,
        num_warmup_steps=int(math.ceil(opt.warmup_ratio * total_steps)),
        num_training_steps=total_steps,
    )
    collate = Collator(config["pad_token_id"])
    n_train = len(train_rows["input_ids"])
    bs, accum = opt.batch_size, opt.grad_accum

    state = new_state()
    best_weights = None
    identity = config.get("identity")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored, best_weights = ckpt_io.restore(d, model, optimizer, scheduler, identity)
        state.update(restored)
        resumed[0] = state["step"]
    if identity:
        state["identity"] = identity
    final_already = state.pop("final", False)

    model.train()
    epoch_batches = batches_for_epoch(n_train, bs, opt.seed, state["epoch"])

    def micro_batches():
        for _ in range(accum):
            idx = next_batch(state, epoch_batches, n_train, opt)
            yield collate([{k: train_rows[k][j] for k in train_rows} for j in idx])

    while not final_already and state["step"] < total_steps and not state["stopped_early"]:
        res = train_step(model, optimizer, params, micro_batches(), device=device,
                         max_grad_norm=opt.max_grad_norm, scheduler=scheduler)
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
        after = after_step(state, opt, metrics, lambda: evaluate(model, eval_rows, collate, bs, device, task))
        if after.new_best:
            best_weights = {k: v.detach().clone() for k, v in adapter_state(model).items()}
        ckpt = None
        if after.checkpoint_due:
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
