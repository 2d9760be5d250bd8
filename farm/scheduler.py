"""The scheduler: a detached, named Ray actor that takes jobs off the queue and runs them on Ray.

Each loop tick (every `poll_s`, or at once when woken by a submit or cancel) it
  1. extends the leases of the jobs it runs (heartbeat) and refreshes the metrics,
  2. re-queues orphans: running jobs whose scheduler is gone (its lease lapsed, or it was an earlier
     incarnation of this very actor that Ray restarted),
  3. records finished attempts: succeeded, or failed -> retrying with backoff / failed,
  4. stops attempts whose cancel was requested: the store records the job cancelled first (refused
     once the attempt has begun publishing, which it may only do through `begin_publish`; such a
     job ends succeeded), then `ray.cancel(force=True)` kills the trainer task's process and the
     Ray Train controller and worker actors it owns,
  5. fills free slots in fair order, each job as one Ray task named `farm-<job id>` that calls the
     training runner (the job id starts with the customer, so the name carries both). When jobs
     wait and no slot is free, `on_no_free_slot` is where a capacity hook goes.

Packed training (farm.train.pack_run): a job with a compatibility key (farm.pack_key) runs in a
pack, one Ray Train run `farm-pack-<id>` on one slot. Each tick, a running pack with room first
admits the next queued job of its key (priority-then-fair order among those jobs) without a new run
or base load; then free slots go, in the global order, to new packs or to jobs that run alone
(`resources.pack: false`, seq_cls, modules_to_save, or pack_max 1: exactly today's run_attempt
path). A packed job keeps its own lease, progress, events ("joined pack X", "left pack X"),
cancel, outcome and retries; the scheduler reads each job's outcome from the pack's channel.

If the actor dies, the trainer tasks it owns die too (Ray's owner fate-sharing). Ray restarts the
actor; its new incarnation re-queues those jobs and they resume from their Ray Train checkpoints
(same run name `farm-<job id>`, same storage), and the catalog's idempotency key (the job id)
keeps a job from publishing twice.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from farm.autoscale import TrainNodeRequests
from farm.costs import ACCELERATOR_SECONDS_COUNTER, TOKENS_COUNTER, attempt_cost
from farm.errors import DataError, ManifestError, ModelError, QueueError
from farm.names import job_log_path, pack_run_name, run_name
from farm.placement import head_resources, training_slots
from farm.queue import Job, JobState, JobStore, open_store

log = logging.getLogger("farm.scheduler")

DEFAULT_RUNNER = "farm.train.run:run_job"
DEFAULT_NAME = "farm-scheduler"
DEFAULT_NAMESPACE = "farm"
# Deterministic input problems: running again cannot fix them, so they fail without retries.
NOT_RETRYABLE = (DataError, ManifestError, ModelError)


@dataclass
class SchedulerConfig:
    name: str = DEFAULT_NAME
    """Ray actor name; one scheduler per name and namespace."""
    namespace: str = DEFAULT_NAMESPACE
    """Ray namespace of the actor."""
    db: str | None = None
    """Queue store URL or path; None = farm.settings.queue_db_path() of the starting process."""
    logs_dir: str | None = None
    """Where per-job logs go (<logs_dir>/jobs/<job id>.log); None = farm.settings.logs_dir()."""
    runner: str = DEFAULT_RUNNER
    """'module:function' called as runner(manifest, job_id=..., on_progress=...) inside the trainer task."""
    slots: int | None = None
    """Jobs at once; None = the cluster's GPUs, or cpu_slots on a cluster without GPUs."""
    cpu_slots: int = 1
    """Jobs at once on a cluster without GPUs."""
    per_customer_limit: int | None = None
    """At most this many running jobs per customer (None = no limit)."""
    poll_s: float = 0.2
    """Loop period; submits and cancels also wake the loop at once."""
    lease_ttl_s: float = 30.0
    """A running job whose lease is not renewed for this long is an orphan."""
    heartbeat_s: float = 2.0
    """How often leases are renewed and metrics refreshed."""
    backoff_base_s: float = 10.0
    """Wait before the 2nd attempt; doubles for each further attempt."""
    backoff_max_s: float = 600.0
    """Longest wait between attempts."""
    pack_max: int | None = None
    """Jobs per pack (packed training, farm.train.pack_run): 1 = every job alone (no packs); None =
    the default: 4 on CPU, derived from GPU memory by the pack's worker on a GPU (farm.plan.pack_capacity)."""
    pack_linger_s: float = 3.0
    """An empty pack waits this long for a compatible job before it ends."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for the actor and its trainer tasks (FARM_HOME, FARM_CATALOG, ...)."""

    def resolved(self) -> SchedulerConfig:
        """Fill the defaults that depend on the starting process's environment."""
        from farm.settings import Settings

        settings = Settings.resolve()
        env = settings.ray_env()  # the actor and its trainer tasks see the same farm as the CLI
        env.update(self.env)
        return SchedulerConfig(**{**asdict(self), "db": str(self.db or settings.queue_db),
                                  "logs_dir": str(self.logs_dir or settings.logs_dir), "env": env})


def load_runner(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise QueueError(f"runner {path!r}: expected 'module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise QueueError(f"runner {path!r} cannot be loaded: {exc}") from None


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line.rstrip("\n") + "\n")


def _fmt_progress(p: dict) -> str:
    parts = [f"step {p.get('step')}/{p.get('total_steps')}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("reward_accuracy", "reward_acc {:.3f}"),
                     ("reward_margin", "reward_margin {:.4f}"), ("eval_reward_accuracy", "eval_reward_acc {:.3f}"),
                     ("tokens_per_s", "{:.0f} tokens/s")):
        if isinstance(p.get(key), (int, float)):
            parts.append(fmt.format(p[key]))
    return ", ".join(parts)


def run_attempt(job_id: str, manifest_doc: dict, lease_id: str, db: str, runner_path: str, log_path: str,
                attempt: int) -> dict:
    """One attempt of one job, inside a Ray task: call the runner, stream its progress to the store
    and the job log, and return what the scheduler records (adapter ref and cost)."""
    from farm.manifest import Manifest

    store = open_store(db)
    logfile = Path(log_path)
    started = time.time()
    last: dict[str, Any] = {}
    written = [0.0]

    def before_publish() -> None:
        if not store.begin_publish(job_id, lease_id):
            raise QueueError(f"job {job_id}: not publishing: a cancel was requested or attempt {attempt} "
                             f"no longer holds the job")

    def on_progress(p: dict) -> None:
        if "step" not in p:  # notes such as a CPU fallback
            _append(logfile, str(p.get("message") or p))
            if p.get("event") == "gate":  # publish gate decisions are job events (farm status, the API)
                store.note(job_id, str(p["message"]))
            return
        last.update(p, attempt_id=lease_id)  # marks whose figures these are (see Scheduler._finish)
        _append(logfile, _fmt_progress(p))
        now = time.time()
        # At most ~4 writes/s per job: progress is for humans and ETAs.
        if now - written[0] >= 0.25 or p.get("step") == p.get("total_steps"):
            written[0] = now
            store.record_progress(job_id, lease_id, dict(last))

    handler = logging.FileHandler(logfile, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        _append(logfile, f"attempt {attempt} started (runner {runner_path}, pid {os.getpid()})")
        manifest = Manifest.model_validate(manifest_doc)
        runner = load_runner(runner_path)
        extra = {"before_publish": before_publish} if _accepts(runner, "before_publish") else {}
        if _accepts(runner, "check_parity"):
            from farm.parity import serving_logprobs

            extra["check_parity"] = serving_logprobs
        result = runner(manifest, job_id=job_id, on_progress=on_progress, **extra)
    except BaseException:
        _append(logfile, f"attempt {attempt} failed:\n{traceback.format_exc()}")
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        if last:
            store.record_progress(job_id, lease_id, dict(last))
        store.close()
    ref = getattr(result, "ref", None) or (result if isinstance(result, str) else None)
    _append(logfile, f"attempt {attempt} succeeded" + (f": published {ref}" if ref else ""))
    return {"adapter_ref": ref, **attempt_cost(last, time.time() - started)}


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether a runner takes keyword `name` (older runners take manifest, job_id, on_progress)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_run_attempt_task = ray.remote(run_attempt)


class _PackHooks:
    """The queue side of a pack's driver (farm.train.pack_run.PackHooks): each job's progress into
    the store under that job's own lease (at most ~4 writes/s per job, as run_attempt) and its log."""

    def __init__(self, db: str, logs_dir: str):
        self.store = open_store(db)
        self.logs_dir = logs_dir
        self.written: dict[str, float] = {}

    def log(self, job_id: str, line: str) -> None:
        try:
            _append(job_log_path(job_id, self.logs_dir), f"[pack] {line}")
        except OSError:
            log.exception("cannot write the log of job %s", job_id)

    def progress(self, job_id: str, lease_id: str, item: dict) -> None:
        if "step" in item and not item.get("final"):
            self.log(job_id, _fmt_progress(item))
        now = time.time()
        if now - self.written.get(job_id, 0.0) >= 0.25 or item.get("step") == item.get("total_steps") \
                or self.written.get(job_id) is None:
            self.written[job_id] = now
            self.store.record_progress(job_id, lease_id, dict(item))

    def begin_publish(self, job_id: str, lease_id: str) -> bool:
        return self.store.begin_publish(job_id, lease_id)

    def close(self) -> None:
        self.store.close()


def run_pack_attempt(pack_id: str, channel: Any, first_manifest: dict, db: str, logs_dir: str, *,
                     linger_s: float, derive_limit: bool) -> dict:
    """A pack's driver inside a Ray task (`farm-pack-<id>`): farm.train.pack_run.run_pack with the queue's hooks."""
    from farm.parity import serving_logprobs
    from farm.train.pack_run import run_pack

    return run_pack(pack_id, channel, first_manifest, _PackHooks(db, logs_dir), linger_s=linger_s,
                    derive_limit=derive_limit, check_parity=serving_logprobs)


_ESTIMATES: dict[str, dict | None] = {}  # manifest (as JSON) -> its pack memory estimate


def pack_member_memory(manifest_doc: dict) -> dict | None:
    """What a job would need in a GPU pack (farm.plan.pack_estimate: the base's bytes and its own,
    from its own batch size, sequence length and LoRA), or None on a CPU job or when it cannot be
    estimated (then the pack's count limit alone applies). Cached: retried jobs ask again."""
    import json

    if not (manifest_doc.get("resources") or {}).get("gpus", 1):
        return None
    key = json.dumps(manifest_doc, sort_keys=True, default=str)
    if key not in _ESTIMATES:
        try:
            from farm.manifest import Manifest
            from farm.plan import pack_estimate

            _ESTIMATES[key] = pack_estimate(Manifest.model_validate(manifest_doc))
        except Exception:  # noqa: BLE001 - an estimate is advice; the job is still offered
            log.warning("no pack memory estimate for a job", exc_info=True)
            _ESTIMATES[key] = None
        if len(_ESTIMATES) > 1024:
            _ESTIMATES.pop(next(iter(_ESTIMATES)))
    return _ESTIMATES[key]


def noop_runner(manifest: Any, *, job_id: str, on_progress: Callable[[dict], None] | None = None) -> None:
    """A runner that trains nothing and publishes nothing: for smoke-testing the farm's plumbing
    (FARM_RUNNER=farm.scheduler:noop_runner) and for bench/job_queue.py's scheduling overhead."""
    if on_progress:
        on_progress({"step": 1, "total_steps": 1, "started_at": time.time(), "tokens": 0})


@dataclass
class _Attempt:
    job_id: str
    customer: str
    lease_id: str
    attempt: int
    started: float


@dataclass
class _Pack:
    pack_id: str
    key: str
    channel: Any
    ref: Any
    started: float
    members: dict[str, _Attempt] = field(default_factory=dict)
    limit: int = 1


class _Metrics:
    """Farm metrics on Ray's Prometheus endpoint (names get Ray's `ray_` prefix there)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.jobs = Gauge("farm_jobs", "Jobs in the queue by state.", tag_keys=("state",))
        self.wait = Histogram("farm_queue_wait_seconds", "Submit (or re-queue) to start of an attempt.",
                              boundaries=[0.5, 1, 5, 15, 60, 300, 900, 3600, 14400], tag_keys=("customer",))
        self.duration = Histogram("farm_job_duration_seconds", "Wall time of finished attempts.",
                                  boundaries=[5, 15, 30, 60, 300, 900, 1800, 3600, 14400, 43200],
                                  tag_keys=("customer", "outcome"))
        self.tokens_per_s = Gauge("farm_job_tokens_per_second", "Training throughput of running jobs.",
                                  tag_keys=("customer", "job_id"))
        self.accel = Counter(*ACCELERATOR_SECONDS_COUNTER, tag_keys=("customer",))
        self.tokens = Counter(*TOKENS_COUNTER, tag_keys=("customer",))
        self.finished = Counter("farm_jobs_finished", "Attempts ended, by outcome.", tag_keys=("customer", "outcome"))
        self.packs = Gauge("farm_packs", "Packs (shared-base Ray Train runs) running.")
        self.pack_jobs = Gauge("farm_pack_jobs", "Jobs training in each running pack.", tag_keys=("pack",))
        self.pack_occupancy = Gauge("farm_pack_occupancy", "Jobs of a running pack over its limit (0..1).",
                                    tag_keys=("pack",))


class Scheduler:
    """The actor body (wrapped with ray.remote by `start`). See the module docstring."""

    def __init__(self, config: dict) -> None:
        self.cfg = SchedulerConfig(**config)
        self.owner = f"{self.cfg.namespace}/{self.cfg.name}/{uuid.uuid4().hex[:8]}"
        self.store: JobStore = open_store(self.cfg.db)
        self.inflight: dict[ray.ObjectRef, _Attempt] = {}
        self.packs: dict[str, _Pack] = {}
        self._held: list[Job] = []  # claimed for a pack that closed before taking it; first in line
        self.metrics = _Metrics()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._slots = 0
        self._grow = TrainNodeRequests.detect()  # farm.autoscale: training nodes for queued work
        self._last_slots = self._last_beat = self._last_reconcile = 0.0
        self.started_at = time.time()
        for job in self.store.recover_orphans(self.owner, takeover=self._is_predecessor):
            self._joblog(job.id, f"scheduler {self.owner} started: {job.state.value} ({job.last_error or 'interrupted'})")
        self._thread = threading.Thread(target=self._loop, name="farm-scheduler-loop", daemon=True)
        self._thread.start()

    # ---- actor methods ------------------------------------------------------------------------

    def ping(self) -> dict:
        running = [a.job_id for a in self.inflight.values()] + [j for p in self.packs.values() for j in p.members]
        return {"owner": self.owner, "slots": self._slots, "running": running,
                "packs": {p.pack_id: sorted(p.members) for p in self.packs.values()},
                "db": self.cfg.db, "runner": self.cfg.runner, "started_at": self.started_at,
                "alive": self._thread.is_alive()}

    def wake(self) -> None:
        """Run a loop tick now (after a submit or cancel): dispatch within milliseconds."""
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------------

    def _is_predecessor(self, owner: str) -> bool:
        prefix = f"{self.cfg.namespace}/{self.cfg.name}/"
        return owner.startswith(prefix) and owner != self.owner

    def _joblog(self, job_id: str, line: str) -> None:
        try:
            _append(job_log_path(job_id, self.cfg.logs_dir), f"[scheduler] {line}")
        except OSError:
            log.exception("cannot write the log of job %s", job_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive a bad tick (DB busy, Ray hiccup)
                log.exception("scheduler tick failed")
            if self.inflight and not self.packs and len(self.inflight) >= self._slots:
                # All slots busy: a submit could not start anything, so wake on the first finish.
                try:
                    ray.wait(list(self.inflight), num_returns=1, timeout=self.cfg.poll_s)
                except Exception:  # noqa: BLE001
                    time.sleep(self.cfg.poll_s)
            else:
                self._wake.wait(self.cfg.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        now = time.time()
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            self.store.heartbeat(self.owner, lease_ttl=self.cfg.lease_ttl_s)
            self._refresh_metrics()
        if now - self._last_reconcile >= max(5.0, self.cfg.heartbeat_s):
            self._last_reconcile = now
            self.store.recover_orphans(self.owner, takeover=self._is_predecessor)
        if self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            for ref in ready:
                self._finish(ref)
        for pack in list(self.packs.values()):
            self._poll_pack(pack)
        for job in self.store.cancel_requests(self.owner):
            self._cancel(job)
        self._fill_slots(self._slot_count(now))

    def _used(self) -> int:
        return len(self.inflight) + len(self.packs)

    @property
    def _packing(self) -> bool:
        """Packs replace the default runner's training; a farm with another runner (noop, tests) runs it."""
        return self.cfg.runner == DEFAULT_RUNNER and (self.cfg.pack_max is None or self.cfg.pack_max > 1)

    def _fill_slots(self, slots: int) -> None:
        """Fill running packs' room with compatible jobs, then start jobs in fair order while slots are free."""
        for pack in list(self.packs.values()):
            while ray.get(pack.channel.room.remote(), timeout=30) > 0:
                job = self.store.claim_next(self.owner, lease_ttl=self.cfg.lease_ttl_s,
                                            per_customer_limit=self.cfg.per_customer_limit, pack_key=pack.key)
                if job is None:
                    break
                if not self._offer(pack, job):
                    self._held.append(job)
                    break
        while self._used() < slots:
            job = self._held.pop(0) if self._held else self.store.claim_next(
                self.owner, lease_ttl=self.cfg.lease_ttl_s, per_customer_limit=self.cfg.per_customer_limit)
            if job is None:
                break
            if self._packing and job.pack_key:
                self._start_pack(job)
            else:
                self._launch(job)
        # farm.autoscale: ask for training nodes while jobs wait with every slot busy, withdraw as
        # the queue drains (runs on every tick, whichever way the loop ended).
        self._grow.update(self.store, self._used(), slots)

    # ---- packs ----------------------------------------------------------------------------------

    def _start_pack(self, job: Job) -> None:
        """A new pack on a free slot, with `job` as its first member."""
        from farm.train.pack_run import PackChannel

        pack_id = uuid.uuid4().hex[:10]
        limit = self.cfg.pack_max or 4
        # a CPU-only cluster runs every pack on CPU: sized by count alone, no wait for the driver
        on_gpu = None if self._gpus_present() and (job.manifest.get("resources") or {}).get("gpus", 1) else False
        channel = ray.remote(PackChannel).options(num_cpus=0, resources=head_resources()).remote(
            pack_id, job.pack_key, limit, self.cfg.pack_max is not None, on_gpu)
        ref = ray.remote(run_pack_attempt).options(
            name=pack_run_name(pack_id), num_cpus=0, max_retries=0, resources=head_resources(),
            runtime_env={"env_vars": self.cfg.env} if self.cfg.env else None,
        ).remote(pack_id, channel, job.manifest, self.cfg.db, self.cfg.logs_dir,
                 linger_s=self.cfg.pack_linger_s, derive_limit=self.cfg.pack_max is None)
        pack = _Pack(pack_id, job.pack_key or "", channel, ref, time.time(), limit=limit)
        self.packs[pack_id] = pack
        log.info("pack %s started (Ray Train run %s)", pack_id, pack_run_name(pack_id))
        if not self._offer(pack, job):  # pragma: no cover - a new pack always has room
            self._held.append(job)

    def _gpus_present(self) -> bool:
        """Whether the cluster has GPUs for training (checked at most once a minute): only GPU packs
        are sized by memory, so a CPU farm never pays for estimates."""
        now = time.monotonic()
        if now - getattr(self, "_gpus_checked", -1e9) > 60:
            from farm.placement import training_capacity

            self._gpus_checked, self._has_gpus = now, training_capacity()[1] > 0
        return self._has_gpus

    def _offer(self, pack: _Pack, job: Job) -> bool:
        assert job.lease_id is not None
        entry = {"job_id": job.id, "lease_id": job.lease_id, "manifest": job.manifest, "attempt": job.attempts,
                 "memory": pack_member_memory(job.manifest) if self._gpus_present() else None}
        if not ray.get(pack.channel.offer.remote(entry), timeout=30):
            for why in ray.get(pack.channel.take_refusals.remote(), timeout=30):
                log.info("pack %s: %s", pack.pack_id, why)  # the job waits for a slot or a pack it fits
            return False
        queued_since = job.created_at if job.attempts == 1 else (job.next_attempt_at or job.updated_at)
        self.metrics.wait.observe(max(0.0, time.time() - queued_since), tags={"customer": job.customer})
        pack.members[job.id] = _Attempt(job.id, job.customer, job.lease_id, job.attempts, time.time())
        self.store.set_pack(job.id, job.lease_id, pack.pack_id,
                            f"joined pack {pack.pack_id} (Ray Train run {pack_run_name(pack.pack_id)})")
        self._joblog(job.id, f"attempt {job.attempts}/{job.max_attempts} joined pack {pack.pack_id} "
                             f"(Ray Train run {pack_run_name(pack.pack_id)})")
        return True

    def _poll_pack(self, pack: _Pack) -> None:
        """Record the outcomes the pack's driver reported; when its run has ended, fail what is left."""
        ended = bool(ray.wait([pack.ref], timeout=0)[0])
        error = None
        if ended:
            try:
                error = (ray.get(pack.ref) or {}).get("error")
            except Exception as exc:  # noqa: BLE001 - the pack's driver died
                error = f"{type(exc).__name__}: the pack's driver died ({str(exc).strip().splitlines()[0]})"
        try:
            results = ray.get(pack.channel.take_results.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - channel gone with its owner
            results = []
        for r in results:
            self._pack_result(pack, r)
        if not ended:
            return
        for job_id in list(pack.members):
            self._pack_result(pack, {"job_id": job_id, "ok": False, "retryable": True,
                                     "error": error or f"pack {pack.pack_id} ended before the job finished"})
        del self.packs[pack.pack_id]
        self.metrics.pack_jobs.set(0, tags={"pack": pack.pack_id})
        self.metrics.pack_occupancy.set(0, tags={"pack": pack.pack_id})
        ray.kill(pack.channel)
        log.info("pack %s ended", pack.pack_id)

    def _pack_result(self, pack: _Pack, r: dict) -> None:
        att = pack.members.pop(r["job_id"], None)
        if att is None:
            return  # cancelled meanwhile: already recorded
        elapsed = time.time() - att.started
        if "accelerator_seconds" in r:
            cost = {"accelerator_seconds": float(r["accelerator_seconds"]), "tokens": int(r.get("tokens") or 0)}
        else:
            cost = attempt_cost(self._attempt_progress(att), elapsed)
        how = "finished" if r.get("ok") else "failed"
        self.store.set_pack(att.job_id, att.lease_id, None, f"left pack {pack.pack_id}: {how}")
        if r.get("ok"):
            job = self.store.succeed(att.job_id, att.lease_id, adapter_ref=r.get("adapter_ref"), **cost)
            if job is not None:
                self._joblog(att.job_id, f"succeeded in pack {pack.pack_id}: {job.adapter_ref or 'no adapter ref'}")
            self._account(att, elapsed, "succeeded", cost["accelerator_seconds"], cost["tokens"])
            return
        error = r.get("error") or "failed in its pack"
        job = self.store.fail_attempt(att.job_id, att.lease_id, error, retryable=bool(r.get("retryable", True)),
                                      backoff_base=self.cfg.backoff_base_s, backoff_max=self.cfg.backoff_max_s, **cost)
        if job is not None:
            self._joblog(att.job_id, f"{job.state.value} (pack {pack.pack_id}): {error}")
        self._account(att, elapsed, "failed", cost["accelerator_seconds"], cost["tokens"])

    def _slot_count(self, now: float) -> int:
        if self.cfg.slots is not None:
            self._slots = self.cfg.slots
        elif now - self._last_slots >= 10 or not self._slots:
            self._last_slots = now
            self._slots = self._grow.slots(lambda: training_slots(self.cfg.cpu_slots))
        return self._slots

    def _launch(self, job: Job) -> None:
        assert job.lease_id is not None
        queued_since = job.created_at if job.attempts == 1 else (job.next_attempt_at or job.updated_at)
        self.metrics.wait.observe(max(0.0, time.time() - queued_since), tags={"customer": job.customer})
        log_path = job_log_path(job.id, self.cfg.logs_dir)
        self._joblog(job.id, f"attempt {job.attempts}/{job.max_attempts} dispatched as Ray task {run_name(job.id)}")
        task = _run_attempt_task.options(
            name=run_name(job.id),  # the Ray dashboard name: farm-<customer>-<id>, like the Train run
            num_cpus=0,  # the Ray Train workers hold the CPU/GPU; this is only their driver
            max_retries=0,  # retries are the queue's, with backoff and a record
            runtime_env={"env_vars": self.cfg.env} if self.cfg.env else None,
            resources=head_resources(),  # beside the queue database it writes progress to
        )
        ref = task.remote(job.id, job.manifest, job.lease_id, self.cfg.db, self.cfg.runner, str(log_path),
                          job.attempts)
        self.inflight[ref] = _Attempt(job.id, job.customer, job.lease_id, job.attempts, time.time())

    def _finish(self, ref: ray.ObjectRef) -> None:
        att = self.inflight.pop(ref)
        elapsed = time.time() - att.started
        try:
            out = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none kills the loop
            cause = getattr(exc, "cause", None) or exc
            error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            if not isinstance(exc, ray.exceptions.RayTaskError):
                error = f"{type(exc).__name__}: the trainer task died ({str(exc).strip().splitlines()[0]})"
            cost = attempt_cost(self._attempt_progress(att), elapsed)
            job = self.store.fail_attempt(
                att.job_id, att.lease_id, error, retryable=not isinstance(cause, NOT_RETRYABLE),
                backoff_base=self.cfg.backoff_base_s, backoff_max=self.cfg.backoff_max_s, **cost,
            )
            outcome = "failed"
            if job is not None:
                self._joblog(att.job_id, f"{job.state.value}: {error}"
                             + (f" (next attempt in {job.next_attempt_at - time.time():.1f} s)"
                                if job.state is JobState.RETRYING and job.next_attempt_at else ""))
            self._account(att, elapsed, outcome, cost["accelerator_seconds"], cost["tokens"])
            return
        job = self.store.succeed(att.job_id, att.lease_id, adapter_ref=out.get("adapter_ref"),
                                 accelerator_seconds=out["accelerator_seconds"], tokens=out["tokens"])
        if job is not None:
            self._joblog(att.job_id, f"succeeded: {job.adapter_ref or 'no adapter ref'}")
        self._account(att, elapsed, "succeeded", out["accelerator_seconds"], out["tokens"])

    def _cancel(self, job: Job) -> None:
        """Stop a running attempt on request. The store decides first (`mark_cancelled`): once the
        attempt has begun publishing it is left to finish and the job ends succeeded with its
        version; otherwise the job is cancelled, then its task is killed, and it can no longer
        publish (its lease is gone, so `begin_publish` refuses). A job of a pack leaves its pack at
        the pack's next step boundary; the other jobs go on."""
        for pack in self.packs.values():
            att = pack.members.get(job.id)
            if att is None:
                continue
            elapsed = time.time() - att.started
            cost = attempt_cost(self._attempt_progress(att), elapsed)
            done = self.store.mark_cancelled(job.id, att.lease_id, f"cancelled on request: left pack {pack.pack_id}",
                                             **cost)
            if done is None:
                return  # publishing (or no longer ours): the pack's outcome is recorded by _poll_pack
            ray.get(pack.channel.leave.remote(job.id), timeout=30)
            del pack.members[job.id]
            self.store.note(job.id, f"left pack {pack.pack_id}: cancelled")
            self._account(att, elapsed, "cancelled", cost["accelerator_seconds"], cost["tokens"])
            self._joblog(job.id, f"cancelled: left pack {pack.pack_id} at its next step boundary, nothing published")
            return
        for ref, att in list(self.inflight.items()):
            if att.job_id != job.id:
                continue
            if ray.wait([ref], timeout=0)[0]:
                self._finish(ref)  # it finished before the cancel: its result stands
                return
            elapsed = time.time() - att.started
            cost = attempt_cost(self._attempt_progress(att), elapsed)
            done = self.store.mark_cancelled(job.id, att.lease_id, "cancelled on request: the trainer task was stopped",
                                             **cost)
            if done is None:
                return  # publishing (or no longer ours): let it finish; _finish records the outcome
            ray.cancel(ref, force=True)  # kills the task's process; its Train actors die with it
            del self.inflight[ref]
            self._account(att, elapsed, "cancelled", cost["accelerator_seconds"], cost["tokens"])
            self._joblog(job.id, "cancelled: trainer task stopped, nothing published")
            return
        # Not running here (e.g. this scheduler restarted): no task of ours can publish it.
        if self.store.mark_cancelled(job.id, job.lease_id or "", "cancelled on request") is not None:
            self._joblog(job.id, "cancelled: no attempt was running, nothing published")

    def _attempt_progress(self, att: _Attempt) -> dict:
        """The latest progress of attempt `att`, or {} if it reported none (the figures stored are an
        earlier attempt's, already charged)."""
        progress = self._progress(att.job_id)
        return progress if progress.get("attempt_id") in (None, att.lease_id) else {}

    def _progress(self, job_id: str) -> dict:
        try:
            return self.store.get(job_id).progress
        except QueueError:
            return {}

    def _account(self, att: _Attempt, elapsed: float, outcome: str, accel: float | None, tokens: Any) -> None:
        tags = {"customer": att.customer}
        self.metrics.duration.observe(elapsed, tags={**tags, "outcome": outcome})
        self.metrics.finished.inc(1, tags={**tags, "outcome": outcome})
        if accel:
            self.metrics.accel.inc(float(accel), tags=tags)
        if tokens:
            self.metrics.tokens.inc(float(tokens), tags=tags)
        self.metrics.tokens_per_s.set(0, tags={**tags, "job_id": att.job_id})

    def _refresh_metrics(self) -> None:
        for state, n in self.store.counts().items():
            self.metrics.jobs.set(n, tags={"state": state})
        self.metrics.packs.set(len(self.packs))
        for pack in self.packs.values():
            self.metrics.pack_jobs.set(len(pack.members), tags={"pack": pack.pack_id})
            self.metrics.pack_occupancy.set(len(pack.members) / max(1, pack.limit), tags={"pack": pack.pack_id})
        for job in self.store.running(self.owner):
            tps = job.progress.get("tokens_per_s")
            if isinstance(tps, (int, float)):
                self.metrics.tokens_per_s.set(float(tps), tags={"customer": job.customer, "job_id": job.id})


# ---- driver-side helpers ----------------------------------------------------------------------


def get(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> ray.actor.ActorHandle | None:
    """The running scheduler actor, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def start(config: SchedulerConfig | None = None, *, timeout_s: float = 60.0) -> ray.actor.ActorHandle:
    """Start the scheduler actor (or return the running one of that name). Ray must be initialized."""
    cfg = (config or SchedulerConfig()).resolved()
    actor_cls = ray.remote(Scheduler)
    handle = actor_cls.options(
        name=cfg.name,
        namespace=cfg.namespace,
        lifetime="detached",  # outlives the CLI that started it
        max_restarts=-1,  # Ray restarts it whenever it dies; the new incarnation re-queues orphans
        max_concurrency=8,  # method calls (wake, ping) run beside the loop thread
        num_cpus=0,
        resources=head_resources(),  # the SQLite queue is on the head's disk; a restart must land there too
        get_if_exists=True,
        runtime_env={"env_vars": cfg.env},
    ).remote(asdict(cfg))
    ray.get(handle.ping.remote(), timeout=timeout_s)
    return handle


def stop(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Kill the scheduler actor for good. Its running jobs stay `running` under a lease that lapses;
    the next scheduler re-queues them and they resume from their last checkpoint."""
    handle = get(name, namespace)
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    return True


def wake(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Nudge the scheduler (fire and forget); False if none is running."""
    handle = get(name, namespace)
    if handle is None:
        return False
    handle.wake.remote()
    return True
