"""The Ray Train worker of a pack: the training engine (farm.train.engine) on a Ray Train worker.

The engine trains; this module connects it to the pack's channel actor
(farm.train.pack_run.PackChannel) and to run storage:

  * at start (and after Ray Train restarted it) it asks for every job admitted and not released,
    reads each one's data and resumes it from that job's own last checkpoint;
  * at every step boundary it polls for new jobs (admitted into the engine) and for jobs to drop
    (cancelled), then runs one engine step;
  * it sends each member's step metrics, checkpoints on the member's cadence and, at its last step,
    writes a FINAL checkpoint and reports it done; the driver publishes it;
  * with no job left it lingers `linger_s`, then asks the channel to close and returns.

Per-job checkpoints live in run storage under `<storage>/farm-pack-jobs/<job id>/` (keyed by the job,
not the pack: a job re-queued into another pack resumes too): `ckpt-<step>` folders holding the
PEFT adapter, trainer_state.pt (optimizer, scheduler, data position, history, identity) and the best
weights, with `LATEST` naming the newest complete one (written last, so a kill mid-write leaves the
previous one in force).

"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from farm.names import PACK_JOBS_FOLDER
from farm.settings import Settings
from farm.train.modelops import build_base
from farm.train.spec import MemberSpec

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


# ---- the worker ----------------------------------------------------------------------------------


def pack_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a pack (one worker); see the module docstring."""
    import ray
    import ray.train
    import torch

    from farm.train.data import load_worker_data
    from farm.train.engine import Engine, Member

    channel = config["channel"]
    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        torch.set_num_threads(config.get("cpu_threads") or Settings.resolve().cpu_train_threads())
    storage, pack_id = config["storage"], config["pack_id"]
    base_cfg = config["model"]
    model, footprint = build_base(base_cfg, kind)
    engine = Engine(model, device, footprint=footprint, base_source=base_cfg.get("source"),
                    base_revision=base_cfg.get("revision"), labels={"pack": pack_id})
    if kind == "cuda":  # the channel sizes every later member against it (and derives the limit if asked)
        ray.get(channel.derive_limit.remote(torch.cuda.get_device_properties(device).total_memory))
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
        print(f"pack {pack_id}: {what}; jobs now: {', '.join(sorted(engine.members)) or 'none'}", flush=True)

    def release(job_id: str) -> None:
        if engine.release(job_id):
            roster(f"job {job_id} left")

    def checkpoint(m: Member, final: bool) -> None:
        # The steps a checkpoint holds are never trained again after a crash, so their cost must reach
        # the channel first: a worker killed between this upload and the next flush lost those steps'
        # tokens from the job's cost (test_multinode: 2930 charged for 3058 trained).
        flush()
        tmp = tempfile.mkdtemp(prefix="farm-packckpt-")
        try:
            engine.write_checkpoint(m, tmp, final=final)
            upload_checkpoint(storage, m.job_id, tmp, f"ckpt-{m.state['step']:08d}" + ("-final" if final else ""))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def admit(spec: MemberSpec) -> None:
        try:
            loaded = load_worker_data(spec.data)
            with tempfile.TemporaryDirectory(prefix="farm-packresume-") as d:
                resume = d if download_checkpoint(storage, spec.job_id, d) else None
                m = engine.admit(spec, loaded.train, loaded.eval, resume=resume)
        except Exception as exc:  # noqa: BLE001 - a job that cannot join fails alone
            release(spec.job_id)
            send(spec.job_id, {"event": "failed", "error": f"{type(exc).__name__}: {exc}", "retryable": True})
            return
        roster(f"job {m.job_id} joined" + (f" (resumed from step {m.resumed_from})" if m.resumed_from else ""))
        send(m.job_id, {"event": "admitted", "resumed_from": m.resumed_from})
        if m.finished:
            send(m.job_id, {"event": "done", "final_metrics": m.state.get("final_metrics", {})})
            release(m.job_id)

    def finish(m: Member) -> None:
        final = engine.finish(m)
        checkpoint(m, final=True)
        send(m.job_id, {**final, "event": "done", "final_metrics": final})
        release(m.job_id)

    for spec in ray.get(channel.admitted.remote()):
        admit(spec)
    flush()
    idle_since = None
    linger = float(config.get("linger_s", 3.0))
    while True:
        new, leave = ray.get(channel.poll.remote(sorted(engine.members)))
        for job_id in leave:
            if job_id in engine.members:
                release(job_id)
                send(job_id, {"event": "left"})
        for spec in new:
            admit(spec)
        flush()
        if not engine.members:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= linger and ray.get(channel.close_if_idle.remote()):
                break
            time.sleep(0.05)
            continue
        idle_since = None
        for up in engine.step():
            m = engine.members[up.job_id]
            if up.failed:
                st = m.state
                send(up.job_id, {"event": "failed", "error": up.failed, "retryable": True,
                                 "step_tokens": up.tokens, "step_seconds": up.seconds,
                                 "train_seconds": st["train_seconds"], "tokens": st["tokens"], "step": st["step"],
                                 "total_steps": m.spec.optim.total_steps})
                release(up.job_id)
                continue
            send(up.job_id, up.metrics)
            if up.done:
                finish(m)
            elif up.checkpoint_due:
                checkpoint(m, final=False)
        flush()
