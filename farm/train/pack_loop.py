"""The Ray Train worker of a pack: one resident base, the adapters of several jobs trained together.

A second caller of the single-job pieces (farm.train.loop's base builder, optimizer, data order and
eval; farm.train.checkpoint's state file; farm.train.pack_lora / pack_step for the packed step), not
a copy of the loop. The worker talks to its pack's channel actor (farm.train.pack_run.PackChannel):

  * at start (and after Ray Train restarted it) it asks for every job admitted and not released,
    and resumes each from that job's own last checkpoint;
  * at every step boundary it polls for new jobs (admitted: their optimizer, schedule and data
    order are built, their adapter joins the PackLoRA) and for jobs to drop (cancelled);
  * per job it keeps the single-job loop's state (step, epoch, batch position, tokens, history,
    eval/early stopping), evaluates and checkpoints on that job's cadence, and at its last step
    writes a FINAL checkpoint and reports it done; the driver publishes it;
  * with no job left it lingers `linger_s`, then asks the channel to close and returns.

Per-job checkpoints live in run storage under `<storage>/farm-pack-jobs/<job id>/` (keyed by the job,
not the pack: a job re-queued into another pack resumes too): `ckpt-<step>` folders holding the
PEFT adapter, trainer_state.pt (optimizer, scheduler, data position, history, identity) and the best
weights, with `LATEST` naming the newest complete one (written last, so a kill mid-write leaves the
previous one in force).

Cost: each step's time is split between the jobs of that step by their share of its tokens, so the
`train_seconds` of the jobs of a pack add up to the pack's step time.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.names import PACK_JOBS_FOLDER
from farm.train import checkpoint as ckpt_io
from farm.train.loop import _batches_for_epoch, _make_optimizer, build_base, evaluate, token_logprobs

LATEST = "LATEST"


# ---- per-job checkpoints in run storage ------------------------------------------------------------


def job_folder(storage: str, job_id: str) -> tuple[Any, str]:
    from farm.settings import run_filesystem

    fs, root = run_filesystem(storage)
    return fs, f"{root}/{PACK_JOBS_FOLDER}/{job_id}"


def upload_checkpoint(storage: str, job_id: str, local: str, name: str) -> None:
    """Copy a local checkpoint folder to the job's storage as `name`, then point LATEST at it; keep two."""
    fs, folder = job_folder(storage, job_id)
    dest = f"{folder}/{name}"
    fs.makedirs(dest, exist_ok=True)
    for f in Path(local).iterdir():
        fs.put_file(str(f), f"{dest}/{f.name}")
    with fs.open(f"{folder}/{LATEST}", "w") as out:
        out.write(name)
    older = sorted(p for p in fs.ls(folder, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("ckpt-"))
    for p in older[:-2]:
        if not p.rstrip("/").endswith(name):
            fs.rm(p, recursive=True)


def download_checkpoint(storage: str, job_id: str, local: str) -> bool:
    """The job's newest checkpoint into `local`; False when it has none."""
    fs, folder = job_folder(storage, job_id)
    if not fs.exists(f"{folder}/{LATEST}"):
        return False
    with fs.open(f"{folder}/{LATEST}", "r") as f:
        name = f.read().strip()
    src = f"{folder}/{name}"
    Path(local).mkdir(parents=True, exist_ok=True)
    for p in fs.ls(src, detail=False):
        fs.get_file(p, str(Path(local) / p.rstrip("/").rsplit("/", 1)[-1]))
    return True


def write_job_checkpoint(folder: str, pack, job_id: str, optimizer, scheduler, state: dict, *, final: bool,
                         base: dict, best_weights: dict | None = None) -> None:
    """A job's checkpoint: the layout of farm.train.checkpoint with the pack's PEFT export as the adapter."""
    import torch
    from safetensors.torch import save_file

    pack.export_adapter(job_id, folder, base.get("source"), base.get("revision"))
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               Path(folder) / ckpt_io.STATE_FILE)
    if best_weights is not None:
        save_file({k: v.detach().cpu().clone() for k, v in best_weights.items()}, str(Path(folder) / ckpt_io.BEST_FILE))
    if final:
        (Path(folder) / ckpt_io.FINAL_MARKER).touch()


# ---- the worker ----------------------------------------------------------------------------------


@dataclass
class _Member:
    """One job of the pack on the worker."""

    spec: dict
    trainer: Any  # farm.train.pack_step.JobTrainer
    train_rows: dict
    eval_rows: dict
    collate: Any
    state: dict
    batches: list = field(default_factory=list)
    best_weights: dict | None = None
    resumed_from: int | None = None
    opt_name: str = "adamw"
    info: dict = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.spec["job_id"]


def _new_state() -> dict:
    return {"step": 0, "epoch": 0, "batch_index": 0, "tokens": 0, "history": [], "best_eval": None,
            "best_step": None, "bad_evals": 0, "train_seconds": 0.0, "stopped_early": False, "micro_total": 0}


def _set_weights(pack, job_id: str, weights: dict) -> None:
    import torch

    with torch.no_grad():
        for name in pack.jobs[job_id].targets:
            ad = pack.layers[name].adapter(job_id)
            ad.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
            ad.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])


def pack_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a pack (one worker); see the module docstring."""
    import ray
    import ray.train
    import torch

    from farm.train.pack_lora import PackLoRA
    from farm.train.pack_step import pack_step_isolating_oom

    channel = config["channel"]
    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        torch.set_num_threads(config.get("cpu_threads") or len(os.sched_getaffinity(0)))
    storage, pack_id = config["storage"], config["pack_id"]
    base_cfg = config["model"]
    model, footprint = build_base(base_cfg, kind)
    pack = PackLoRA(model)
    base_params = sum(p.numel() for p in model.parameters())
    if kind == "cuda":  # the channel sizes every later member against it (and derives the limit if asked)
        ray.get(channel.derive_limit.remote(torch.cuda.get_device_properties(device).total_memory))
    members: dict[str, _Member] = {}
    node_id = ray.get_runtime_context().get_node_id()
    pid = os.getpid()
    outbox: list[dict] = []

    def send(job_id: str, item: dict) -> None:
        outbox.append({**item, "job_id": job_id, "pid": pid, "node_id": node_id, "device": kind, "pack": pack_id})

    def flush() -> None:
        if outbox:
            ray.get(channel.put_events.remote(list(outbox)))
            outbox.clear()

    def roster(what: str) -> None:
        # The worker's log (the Ray dashboard shows it with the Train run): which jobs the pack holds.
        # Ray Train V2 has no run metadata to carry this (TorchTrainer(metadata=) is deprecated).
        print(f"pack {pack_id}: {what}; jobs now: {', '.join(sorted(members)) or 'none'}", flush=True)

    def release(job_id: str) -> None:
        was_member = members.pop(job_id, None) is not None
        if job_id in pack.jobs:
            pack.remove_job(job_id)
        if was_member:
            roster(f"job {job_id} left")

    def checkpoint(m: _Member, final: bool) -> None:
        tmp = tempfile.mkdtemp(prefix="farm-packckpt-")
        try:
            state = {**m.state, "micro_total": m.trainer.micro_total, "identity": m.spec["identity"]}
            write_job_checkpoint(tmp, pack, m.job_id, m.trainer.optimizer, m.trainer.scheduler, state,
                                 final=final, base=base_cfg, best_weights=m.best_weights)
            upload_checkpoint(storage, m.job_id, tmp, f"ckpt-{m.state['step']:08d}" + ("-final" if final else ""))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def admit(spec: dict) -> None:
        from transformers import get_scheduler

        from farm.train.data import Collator
        from farm.train.pack_step import JobTrainer

        job_id, opt = spec["job_id"], spec["optim"]
        try:
            params = pack.add_job(job_id, spec["lora"], opt["seed"])
            optimizer, opt_name = _make_optimizer(opt["optimizer"], params, opt["learning_rate"],
                                                  opt["weight_decay"], kind)
            total = opt["total_steps"]
            sched = get_scheduler(opt["lr_scheduler"], optimizer,
                                  num_warmup_steps=int(math.ceil(opt["warmup_ratio"] * total)),
                                  num_training_steps=total)
            trainer = JobTrainer(job_id, params, optimizer, sched, grad_accum=opt["grad_accum"],
                                 max_grad_norm=opt["max_grad_norm"], seed=opt["seed"])
            from farm.train.data import load_worker_data

            loaded = load_worker_data(spec["data"])
            train_rows, eval_rows = loaded.train, loaded.eval
            trainable = sum(p.numel() for p in params)
            m = _Member(spec, trainer, train_rows, eval_rows, Collator(spec["pad_token_id"]), _new_state(),
                        opt_name=opt_name, info={"params_trainable": trainable, "params_total": base_params + trainable,
                                                 "base_footprint_bytes": footprint})
            with tempfile.TemporaryDirectory(prefix="farm-packresume-") as d:
                if download_checkpoint(storage, job_id, d):
                    state = ckpt_io.read_state(d)
                    ckpt_io.check_identity(state, spec["identity"], f"job {job_id}")
                    pack.load_adapter(job_id, d)
                    optimizer.load_state_dict(state.pop("optimizer"))
                    sched.load_state_dict(state.pop("scheduler"))
                    if (Path(d) / ckpt_io.BEST_FILE).exists():
                        from safetensors.torch import load_file

                        m.best_weights = load_file(str(Path(d) / ckpt_io.BEST_FILE))
                    m.state.update(state)
                    trainer.step, trainer.micro_total = m.state["step"], m.state.get("micro_total", 0)
                    m.resumed_from = m.state["step"]
        except Exception as exc:  # noqa: BLE001 - a job that cannot join fails alone
            release(job_id)
            send(job_id, {"event": "failed", "error": f"{type(exc).__name__}: {exc}", "retryable": True})
            return
        m.batches = _batches_for_epoch(len(train_rows["input_ids"]), opt["batch_size"], opt["seed"], m.state["epoch"])
        members[job_id] = m
        roster(f"job {job_id} joined" + (f" (resumed from step {m.resumed_from})" if m.resumed_from else ""))
        send(job_id, {"event": "admitted", "resumed_from": m.resumed_from})
        if m.state.pop("final", False):
            send(job_id, {"event": "done", "final_metrics": m.state.get("final_metrics", {})})
            release(job_id)

    def micro_batch(m: _Member) -> dict:
        opt, st = m.spec["optim"], m.state
        if st["batch_index"] >= len(m.batches):
            st["epoch"] += 1
            st["batch_index"] = 0
            m.batches = _batches_for_epoch(len(m.train_rows["input_ids"]), opt["batch_size"], opt["seed"], st["epoch"])
        idx = m.batches[st["batch_index"]]
        st["batch_index"] += 1
        return m.collate([{k: m.train_rows[k][j] for k in m.train_rows} for j in idx])

    def job_eval(m: _Member) -> dict:
        with pack.rows({m.job_id: slice(None)}):
            return evaluate(model, m.eval_rows, m.collate, m.spec["optim"]["batch_size"], device, "causal_lm")

    def finish(m: _Member) -> None:
        st, opt = m.state, m.spec["optim"]
        if st["stopped_early"] and m.best_weights is not None:
            _set_weights(pack, m.job_id, m.best_weights)
        final = job_eval(m)
        if m.spec.get("parity_rows"):  # the training side of the train/serve parity gate, as loop.py records it
            with pack.rows({m.job_id: slice(None)}):
                st["parity_rows"] = token_logprobs(model, m.eval_rows, m.spec["parity_rows"], device)
        final.update({"step": st["step"], "total_steps": opt["total_steps"], "tokens": st["tokens"],
                      "train_seconds": st["train_seconds"], "optimizer": m.opt_name,
                      "stopped_early": st["stopped_early"], "final": True, "pack": pack_id, **m.info})
        st["history"].append(final)
        st["final_metrics"] = final
        checkpoint(m, final=True)
        send(m.job_id, {**final, "event": "done", "final_metrics": final})
        release(m.job_id)

    for spec in ray.get(channel.admitted.remote()):
        admit(spec)
    flush()
    model.train()
    idle_since = None
    linger = float(config.get("linger_s", 3.0))
    while True:
        new, leave = ray.get(channel.poll.remote(sorted(members)))
        for job_id in leave:
            if job_id in members:
                release(job_id)
                send(job_id, {"event": "left"})
        for spec in new:
            admit(spec)
        flush()
        if not members:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= linger and ray.get(channel.close_if_idle.remote()):
                break
            time.sleep(0.05)
            continue
        idle_since = None
        micro = {j: micro_batch(m) for j, m in members.items()}
        pad = next(iter(members.values())).spec["pad_token_id"]
        if kind == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # out of memory: the member with the largest micro-batch fails alone, the others step without it
        results = pack_step_isolating_oom(model, pack, {j: m.trainer for j, m in members.items()}, micro, pad, device)
        if kind == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        all_tokens = sum(r.tokens for r in results.values()) or 1
        for job_id, res in results.items():
            m = members[job_id]
            st, opt = m.state, m.spec["optim"]
            share = dt * res.tokens / all_tokens
            st["train_seconds"] += share
            st["tokens"] += res.tokens
            st["micro_total"] = m.trainer.micro_total
            if res.failed:
                why = res.failed if res.out_of_memory else f"training diverged: {res.failed}"
                send(job_id, {"event": "failed", "error": why, "retryable": True,
                              "step_tokens": res.tokens, "step_seconds": share, "train_seconds": st["train_seconds"],
                              "tokens": st["tokens"], "step": st["step"], "total_steps": opt["total_steps"]})
                release(job_id)
                continue
            st.setdefault("_step_tokens", 0)
            st["_step_tokens"] += res.tokens
            st.setdefault("_step_seconds", 0.0)
            st["_step_seconds"] += share
            if not res.stepped:
                continue
            st["step"] = m.trainer.step
            step_tokens, step_seconds = st.pop("_step_tokens"), st.pop("_step_seconds")
            total = opt["total_steps"]
            metrics = {
                "step": st["step"], "total_steps": total, "epoch": st["epoch"], "loss": res.step_loss,
                "learning_rate": m.trainer.scheduler.get_last_lr()[0], "tokens": st["tokens"],
                "tokens_per_s": step_tokens / step_seconds if step_seconds > 0 else 0.0,
                "train_seconds": st["train_seconds"], "step_tokens": step_tokens, "step_seconds": step_seconds,
                "attempt_resumed_from": m.resumed_from, "pack_jobs": len(results),
            }
            last = st["step"] >= total
            eval_every, patience = opt.get("eval_every"), opt.get("early_stopping_patience")
            if eval_every and st["step"] % eval_every == 0 and not last:
                metrics.update(job_eval(m))
                model.train()
                if st["best_eval"] is None or metrics["eval_loss"] < st["best_eval"]:
                    st["best_eval"], st["best_step"], st["bad_evals"] = metrics["eval_loss"], st["step"], 0
                    if patience:
                        m.best_weights = {k: v.clone() for k, v in pack.state_dict(job_id).items()}
                else:
                    st["bad_evals"] += 1
                    if patience and st["bad_evals"] >= patience:
                        st["stopped_early"] = True
            st["history"].append(metrics)
            send(job_id, metrics)
            every = opt.get("checkpoint_every")
            if last or st["stopped_early"]:
                finish(m)
                model.train()
            elif every and st["step"] % every == 0:
                checkpoint(m, final=False)
        flush()
