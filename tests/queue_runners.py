"""Small real runner functions for queue/scheduler tests, and a manifest factory.

Ray workers import this module by its dotted path (`tests.queue_runners:...`), so it must stay
importable from the repository root. Runners take their cues from the manifest (`training.max_steps`
= steps, `training.seed` = milliseconds per step) and leave traces under FARM_HOME, which the
scheduler passes to its tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from farm.errors import TrainingError
from farm.manifest import Manifest, parse_manifest
from farm.settings import farm_home


def make_manifest(customer: str = "acme", adapter: str = "a", **over) -> Manifest:
    data = {
        "customer": customer,
        "adapter": adapter,
        "base_model": "tiny/llama",
        "dataset": {"train": "/data/train.jsonl"},
        "training": {"max_steps": over.pop("steps", 1), "seed": over.pop("ms_per_step", 0)},
        **over,
    }
    return parse_manifest(data)


@dataclass
class FakeVersion:
    ref: str


def _trace(name: str, line: str) -> None:
    path = farm_home() / name
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_trace(home: Path, name: str) -> list[str]:
    p = home / name
    return p.read_text().split() if p.exists() else []


def _steps(manifest: Manifest, job_id: str, on_progress) -> None:
    total = manifest.training.max_steps or 1
    for step in range(1, total + 1):
        time.sleep(manifest.training.seed / 1000)
        if on_progress:
            on_progress({"step": step, "total_steps": total, "loss": 1.0 / step, "tokens_per_s": 100.0,
                         "accelerator_seconds": 0.5 * step, "tokens": 10 * step})


def _publish(manifest: Manifest, job_id: str) -> FakeVersion:
    """Publish once per job id, like the catalog's idempotency key."""
    marker = farm_home() / "published" / job_id
    marker.parent.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(job_id)
        _trace("publish.log", job_id)
    return FakeVersion(f"{manifest.customer}/{manifest.adapter}@v1")


def record(manifest: Manifest, *, job_id: str, on_progress=None, before_publish=None) -> FakeVersion:
    """Runs its steps, logs the job id to start.log and its pid to pids.log at start, publishes
    (through the scheduler's publish gate, like farm.train.run)."""
    _trace("start.log", job_id)
    _trace("pids.log", f"{job_id}:{os.getpid()}")
    import ray

    if ray.is_initialized():  # inside the scheduler's task: the name the Ray dashboard shows
        _trace("tasks.log", ray.get_runtime_context().get_task_name() or "?")
    _steps(manifest, job_id, on_progress)
    if before_publish is not None:
        before_publish()
    return _publish(manifest, job_id)


def publish_after_cancel(manifest: Manifest, *, job_id: str, on_progress=None, before_publish=None) -> FakeVersion:
    """Passes the publish gate, then waits until a cancel has been requested before publishing:
    the cancel arrives while the job is publishing."""
    from farm.queue import open_store

    _steps(manifest, job_id, on_progress)
    before_publish()
    _trace("publishing.log", job_id)
    store = open_store()
    try:
        deadline = time.time() + 60
        while not store.get(job_id).cancel_requested and time.time() < deadline:
            time.sleep(0.05)
    finally:
        store.close()
    return _publish(manifest, job_id)


def pid_of(home: Path, job_id: str) -> int | None:
    for line in read_trace(home, "pids.log"):
        jid, _, pid = line.partition(":")
        if jid == job_id:
            return int(pid)
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def always_fail(manifest: Manifest, *, job_id: str, on_progress=None) -> FakeVersion:
    _trace("start.log", f"{job_id}@{time.time():.3f}")
    raise TrainingError(f"job {job_id}: the loss went NaN at step 1")
