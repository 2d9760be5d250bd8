"""The Ray Train worker of a job that runs outside a pack: the job as a pack of one on the training
engine (farm.train.engine), checkpointed through Ray Train. Every task kind (causal_lm, seq_cls with
its classification head) and every feature (methods, modules_to_save, eval cadence, early stopping
with best-weights restore, the baseline adapter's eval, parity rows) is the engine's; this shell owns
Ray: the device, progress to the driver, `ray.train.report` and its checkpoints.

Runs inside a Ray Train worker process; gets plain arguments (see farm.train.run.loop_config), never
a manifest, and reads and tokenizes the job's data itself (farm.train.data.load_worker_data).
Checkpoints (the engine's `write_checkpoint`, farm.train.checkpoint's layout) hold everything needed
to resume exactly: adapter weights (a classification head or other saved modules included),
optimizer, scheduler, RNG state, the data position and the best weights so far, so a restarted
worker ends at the planned step count and early stopping still publishes the best weights.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from farm.settings import Settings
from farm.train import checkpoint as ckpt_io
from farm.train.modelops import build_base

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one worker per job): the job as a pack of one on the training engine."""
    import ray
    import ray.train
    import torch

    from farm.train.data import load_worker_data

    device = ray.train.torch.get_device()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        # Ray pins OMP threads to the worker's logical CPUs; a CPU-only job uses the cores it has, or
        # FARM_TRAIN_THREADS where workers share a node's cores.
        torch.set_num_threads(config.get("cpu_threads") or Settings.resolve().cpu_train_threads())
    # Seeded before the base loads: a seq_cls head is drawn new at load, and a base's own dropout (GPT-2's)
    # draws from this RNG (the engine's checkpoints carry its state).
    _seed_all(config["member"].optim.seed)
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
    _train_on_engine(config, base, footprint, data, device, emit, resumed)


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
