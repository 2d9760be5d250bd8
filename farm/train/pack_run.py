"""A pack: one Ray Train run (`farm-pack-<id>`, one worker, one slot) that loads the base once and
trains the adapters of several compatible jobs (farm.pack_key), admitting jobs while it runs.

Three parties, one channel:

  * the scheduler (farm.scheduler) creates a `PackChannel` actor and offers it jobs it has claimed
    (each keeps its own lease, progress, events and retries); it asks for each job's outcome with
    `take_results` and asks a job to leave with `leave` (a cancel);
  * the driver, `run_pack` (a Ray task named `farm-pack-<id>`), prepares every offered job with
    farm.train.run.prepare (all input errors fail that job alone, before it joins), puts its data in
    the object store, hands the worker its plain arguments (`admit`), streams each job's progress to
    the queue and its log, and publishes each finished job exactly once through
    farm.train.run.publish (the catalog's idempotency key is the job id; `begin_publish` in the
    queue gates it, as for a job alone);
  * the worker (farm.train.pack_loop) trains them; when Ray Train restarts it after a crash it asks
    the channel for every admitted job again and resumes each from its own checkpoint.

When the pack is empty for its linger time the worker closes the channel (no more offers are taken)
and the run ends; the slot is free again.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
import traceback
from typing import Any, Protocol

from farm.costs import AttemptCost
from farm.errors import DataError, ManifestError, ModelError
from farm.names import pack_run_name
from farm.train.spec import MemberSpec

log = logging.getLogger("farm.pack")


class PackChannel:
    """The pack's mailbox (a small Ray actor, wrapped by the scheduler). Plain, synchronous methods:
    every state change is atomic, so a job offered while the pack closes is refused, never lost."""

    def __init__(self, pack_id: str, key: str, limit: int, explicit_limit: bool = True, on_gpu: bool | None = None):
        self.pack_id, self.key, self.limit, self.explicit = pack_id, key, max(1, int(limit)), explicit_limit
        # Memory (GPU packs): every member brings its own estimate (farm.plan.pack_estimate, in the
        # scheduler's offer); a member joins only if the base and all members, it included, fit the
        # GPU the worker reports. Until the driver has said where the pack runs (set_device) and, on
        # a GPU, the worker how much memory it has (derive_limit), a pack takes its first job only.
        self.on_gpu = on_gpu  # the scheduler's expectation (False on a CPU-only cluster); the driver confirms
        self.gpu_bytes: int | None = None
        self.base_bytes: int | None = None
        self.member_bytes: dict[str, int] = {}  # job id -> its estimate (members with one)
        self.refusals: list[str] = []  # why offers were refused (the scheduler logs them)
        self.offers: dict[str, dict] = {}  # job id -> what the scheduler offered (not yet prepared)
        self.specs: dict[str, MemberSpec] = {}  # job id -> what the worker trains (admitted, not released)
        self.members: set[str] = set()  # offered and not yet finished (the pack's occupancy)
        self.delivered: set[str] = set()
        self.leaves: set[str] = set()
        self.events: list[dict] = []
        self.results: list[dict] = []
        self.closed = False

    # scheduler side
    def offer(self, entry: dict) -> bool:
        if self.closed or len(self.members) >= self.limit:
            return False
        memory = entry.get("memory") or {}
        why = self._misfit(memory.get("job_bytes")) if self.members else None
        if why:
            self.refusals.append(f"job {entry['job_id']} not admitted: {why}")
            return False
        if self.base_bytes is None and memory.get("base_bytes"):
            self.base_bytes = int(memory["base_bytes"])
        if memory.get("job_bytes"):
            self.member_bytes[entry["job_id"]] = int(memory["job_bytes"])
        self.offers[entry["job_id"]] = entry
        self.members.add(entry["job_id"])
        return True

    def _misfit(self, job_bytes: int | None) -> str | None:
        """Why one more member (beyond the first, which always runs) does not fit; None: it fits."""
        if self.on_gpu is False:
            return None  # a CPU pack: the count limit alone
        if self.on_gpu is None or self.gpu_bytes is None:
            return "the pack's GPU memory is not known yet"
        if self.base_bytes is None or not job_bytes:
            return None  # no estimate to go by: the count limit stands, as before
        from farm.plan import pack_fits

        if pack_fits(self.base_bytes, [*self.member_bytes.values(), int(job_bytes)], self.gpu_bytes):
            return None
        return (f"its estimate of {int(job_bytes)} bytes does not fit beside the base ({self.base_bytes} bytes) and "
                f"{len(self.members)} member(s) ({sum(self.member_bytes.values())} bytes) on a GPU of "
                f"{self.gpu_bytes} bytes")

    def room(self) -> int:
        if self.closed:
            return 0
        if self.members and (self.on_gpu is None or (self.on_gpu and self.gpu_bytes is None)):
            return 0  # sized once the driver / the worker report (offer then checks each job's bytes)
        return max(0, self.limit - len(self.members))

    def take_refusals(self) -> list[str]:
        out, self.refusals = self.refusals, []
        return out

    def info(self) -> dict:
        return {"pack": self.pack_id, "key": self.key, "limit": self.limit, "jobs": sorted(self.members),
                "closed": self.closed}

    def leave(self, job_id: str) -> None:
        self.member_bytes.pop(job_id, None)
        self.offers.pop(job_id, None)
        self.specs.pop(job_id, None)
        self.members.discard(job_id)
        self.leaves.add(job_id)

    def take_results(self) -> list[dict]:
        out, self.results = self.results, []
        return out

    # driver side
    def take_offers(self) -> list[dict]:
        out = list(self.offers.values())
        self.offers.clear()
        return out

    def admit(self, spec: MemberSpec) -> None:
        if spec.job_id in self.members:  # not cancelled while it was prepared
            self.specs[spec.job_id] = spec

    def finish(self, result: dict) -> None:
        job_id = result["job_id"]
        self.specs.pop(job_id, None)
        self.offers.pop(job_id, None)
        self.member_bytes.pop(job_id, None)
        if job_id in self.members:
            self.members.discard(job_id)
            self.results.append(result)

    def take_events(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    def is_member(self, job_id: str) -> bool:
        return job_id in self.members

    # worker side
    def admitted(self) -> list[MemberSpec]:
        """Every admitted, unreleased job: what a (re)started worker trains."""
        self.delivered = set(self.specs)
        self.leaves.clear()
        return list(self.specs.values())

    def poll(self, known: list[str]) -> tuple[list[MemberSpec], list[str]]:
        new = [s for j, s in self.specs.items() if j not in self.delivered]
        self.delivered.update(s.job_id for s in new)
        leave = sorted(self.leaves & set(known))
        self.leaves -= set(leave)
        return new, leave

    def put_events(self, items: list[dict]) -> None:
        self.events.extend(items)

    def close_if_idle(self) -> bool:
        if not self.members:
            self.closed = True
        return self.closed

    def derive_limit(self, gpu_bytes: int) -> int:
        """The worker's GPU memory: from now on each offer is checked against it (all members' bytes);
        without an explicit --pack-max also the count limit from the first job's estimate
        (farm.plan.pack_capacity), an upper bound only."""
        self.gpu_bytes = int(gpu_bytes)
        est = getattr(self, "estimate", None)
        if not self.explicit and est:
            from farm.plan import pack_capacity

            self.limit = pack_capacity(est["base_bytes"], est["job_bytes"], gpu_bytes)
        return self.limit

    def set_device(self, on_gpu: bool) -> None:
        """Where the pack runs (the driver's placement): GPU packs are sized by memory."""
        self.on_gpu = bool(on_gpu)

    def set_estimate(self, estimate: dict) -> None:
        self.estimate = estimate
        if self.base_bytes is None:
            self.base_bytes = int(estimate["base_bytes"])


class PackHooks(Protocol):
    """What the driver tells the job queue (farm.scheduler supplies it: train never imports queue)."""

    def progress(self, job_id: str, lease_id: str, item: dict) -> None: ...
    def log(self, job_id: str, line: str) -> None: ...
    def begin_publish(self, job_id: str, lease_id: str) -> bool: ...
    def close(self) -> None: ...


NOT_RETRYABLE = (DataError, ManifestError, ModelError)  # as farm.scheduler: running again cannot fix them


class _Driver:
    """The driver's side of one pack (inside the run_pack task)."""

    def __init__(self, pack_id: str, channel, hooks: PackHooks, settings, check_parity=None):
        self.pack_id, self.channel, self.hooks, self.settings = pack_id, channel, hooks, settings
        self.check_parity = check_parity  # farm.parity.serving_logprobs, passed by the scheduler
        self.jobs: dict[str, Any] = {}  # job id -> Prepared
        self.leases: dict[str, str] = {}
        self.costs: dict[str, AttemptCost] = {}
        self.last: dict[str, dict] = {}
        self.histories: dict[str, list] = {}
        self.done: set[str] = set()
        self.placement = None
        self.stop = threading.Event()
        self.publishing: queue.Queue[str] = queue.Queue()

    def prepare_offers(self) -> None:
        import ray

        from farm.manifest import Manifest
        from farm.train import builders
        from farm.train.run import PARITY_ROWS, prepare

        for entry in ray.get(self.channel.take_offers.remote()):
            job_id = entry["job_id"]
            self.leases[job_id] = entry["lease_id"]
            self.hooks.log(job_id, f"attempt {entry['attempt']} joining pack {self.pack_id}")
            try:
                job = prepare(Manifest.model_validate(entry["manifest"]), job_id)
            except Exception as exc:  # noqa: BLE001 - this job fails alone
                self.hooks.log(job_id, f"cannot join pack {self.pack_id}:\n{traceback.format_exc()}")
                self.channel.finish.remote({"job_id": job_id, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                            "retryable": not isinstance(exc, NOT_RETRYABLE), **self._cost(job_id)})
                continue
            m = job.manifest
            self.jobs[job_id] = job
            self.costs[job_id] = AttemptCost(self.placement.gpus if self.placement else 0)
            # the worker reads and tokenizes the data itself; it records the parity rows' logprobs and
            # publish compares them with the server's
            self.channel.admit.remote(builders.member_spec(
                m, job_id, job.data.train_rows, job.data.stats, job.pad_token_id, identity=job.identity,
                parity_rows=PARITY_ROWS if self.check_parity is not None and m.task == "causal_lm" else 0))

    def _cost(self, job_id: str) -> dict:
        from farm.costs import attempt_cost

        return attempt_cost(self.last.get(job_id, {}), 0.0)

    def progress(self, item: dict) -> None:
        job_id = item["job_id"]
        lease = self.leases.get(job_id)
        event = item.get("event")
        if event is None and lease is not None:
            item = self.costs[job_id].annotate(dict(item))
            self.last[job_id] = {**item, "attempt_id": lease}
            self.histories.setdefault(job_id, []).append(item)
            self.hooks.progress(job_id, lease, self.last[job_id])
        elif event == "admitted":
            note = f" (resumed from step {item['resumed_from']})" if item.get("resumed_from") is not None else ""
            self.hooks.log(job_id, f"training in pack {self.pack_id} on pid {item.get('pid')}{note}")
        elif event == "failed":
            if "step_tokens" in item and job_id in self.costs:
                self.last[job_id] = {**self.costs[job_id].annotate(dict(item)), "attempt_id": lease}
            self.hooks.log(job_id, f"failed in pack {self.pack_id}: {item['error']}")
            self.channel.finish.remote({"job_id": job_id, "ok": False, "error": item["error"],
                                        "retryable": item.get("retryable", True), **self._cost(job_id)})
        elif event == "done" and job_id not in self.done:
            self.done.add(job_id)
            self.publishing.put(job_id)  # its own thread: a publish never delays a join

    def publish(self, job_id: str) -> None:
        import ray

        from farm.errors import QueueError
        from farm.train.pack_loop import download_checkpoint
        from farm.train.run import Fitted, publish

        job, lease = self.jobs.get(job_id), self.leases.get(job_id)
        if job is None or not ray.get(self.channel.is_member.remote(job_id)):
            return  # cancelled meanwhile: nothing is published
        tmp = tempfile.mkdtemp(prefix="farm-packpub-")
        try:
            if not download_checkpoint(self.settings.storage_path, job_id, tmp):
                raise QueueError(f"job {job_id}: no final checkpoint in run storage")

            def gate() -> None:
                if not self.hooks.begin_publish(job_id, lease):
                    raise QueueError(f"job {job_id}: not publishing: a cancel was requested or the attempt "
                                     f"no longer holds the job")

            fitted = Fitted(tmp, self.placement, self.histories.get(job_id, []), lineage={"pack": self.pack_id})
            version = publish(job, fitted, before_publish=gate, check_parity=self.check_parity,
                              on_event=lambda e: self.hooks.log(job_id, str(e.get("message"))))
        except Exception as exc:  # noqa: BLE001 - this job fails alone
            self.hooks.log(job_id, f"publish failed:\n{traceback.format_exc()}")
            self.channel.finish.remote({"job_id": job_id, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                        "retryable": True, **self._cost(job_id)})
            return
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if lease and job_id in self.last:
            self.hooks.progress(job_id, lease, self.last[job_id])
        self.hooks.log(job_id, f"published {version.ref} (pack {self.pack_id})")
        self.channel.finish.remote({"job_id": job_id, "ok": True, "adapter_ref": version.ref, **self._cost(job_id)})

    def _serve(self, what: str, work) -> None:
        while True:
            stopping = self.stop.is_set()
            try:
                work()
            except Exception:  # noqa: BLE001 - keep serving the other jobs
                log.exception("pack %s: driver %s failed", self.pack_id, what)
            if stopping:
                return
            self.stop.wait(0.02)

    def _events(self) -> None:
        import ray

        for item in ray.get(self.channel.take_events.remote()):
            self.progress(item)

    def _publishes(self) -> None:
        while True:
            try:
                job_id = self.publishing.get_nowait()
            except queue.Empty:
                return
            self.publish(job_id)

    def start(self) -> list[threading.Thread]:
        """Three threads: admissions (prepare offers), the worker's events, publishes; they drain and
        return once `stop` is set."""
        threads = [threading.Thread(target=self._serve, args=(name, work), name=f"farm-pack-{name}", daemon=True)
                   for name, work in (("admit", self.prepare_offers), ("events", self._events),
                                      ("publish", self._publishes))]
        for t in threads:
            t.start()
        return threads


def run_pack(pack_id: str, channel, first_manifest: dict, hooks: PackHooks, pack_max_failures: int = 3,
             linger_s: float = 3.0, derive_limit: bool = False, check_parity=None) -> dict:
    """The pack's driver (a Ray task): the Train run `farm-pack-<id>` and its jobs' publishes.

    `check_parity` (farm.parity.serving_logprobs) turns on the train/serve parity gate for the causal LM
    members, as farm.train.run.run_job does for a job alone."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from farm.manifest import Manifest
    from farm.placement import worker_placement
    from farm.settings import Settings
    from farm.train import builders
    from farm.train.pack_loop import pack_loop_per_worker
    from farm.train.run import run_storage
    from farm.train.trainer import farm_trainer

    settings = Settings.resolve()
    first = Manifest.model_validate(first_manifest)
    driver = _Driver(pack_id, channel, hooks, settings, check_parity=check_parity)
    placement = worker_placement(first.resources.gpus, pack_run_name(pack_id))
    driver.placement = placement
    ray.get(channel.set_device.remote(bool(placement.use_gpu)))
    try:
        from farm.plan import pack_estimate

        ray.get(channel.set_estimate.remote(pack_estimate(first)))
    except Exception:  # noqa: BLE001 - no estimate: the explicit or default limit stands
        log.warning("pack %s: no memory estimate", pack_id, exc_info=True)
    threads = driver.start()
    store_path, store_fs = run_storage(settings.storage_path)
    config = {"channel": channel, "pack_id": pack_id, "model": builders.model_config(first),
              "storage": settings.storage_path, "gpus": placement.gpus, "linger_s": linger_s,
              "derive_limit": derive_limit}
    trainer = farm_trainer(
        pack_loop_per_worker,
        config=config,
        settings=settings,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=placement.use_gpu, resources_per_worker=placement.resources),
        run_config=RunConfig(name=pack_run_name(pack_id), storage_path=store_path, storage_filesystem=store_fs,
                             failure_config=FailureConfig(max_failures=pack_max_failures)),
    )
    error = None
    started = time.time()
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - every unfinished job of the pack fails (and retries)
        from farm.train.run import _root_cause

        error = f"pack {pack_id}: training failed: {_root_cause(exc)}"
        log.error(error)
    finally:
        driver.stop.set()
        for t in threads:
            t.join(timeout=600)
        driver._publishes()  # a "done" the events thread queued after the publish thread's last pass
    # Jobs left unfinished (the run failed): each fails its attempt, with its own retry policy.
    info = ray.get(channel.info.remote())
    for job_id in info["jobs"]:
        ray.get(channel.finish.remote({"job_id": job_id, "ok": False, "retryable": True,
                                       "error": error or f"pack {pack_id} ended before the job finished",
                                       **driver._cost(job_id)}))
    hooks.close()
    return {"pack": pack_id, "seconds": time.time() - started, "error": error}

