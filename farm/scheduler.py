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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from farm.autoscale import TrainNodeRequests
from farm.costs import attempt_cost
from farm.errors import DataError, ManifestError, ModelError, QueueError
from farm.placement import head_resources, training_slots
from farm.queue import Job, JobState, JobStore, job_log_path, open_store, run_name

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
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("tokens_per_s", "{:.0f} tokens/s")):
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
        self.accel = Counter("farm_accelerator_seconds", "Accelerator-seconds used, per customer.",
                             tag_keys=("customer",))
        self.tokens = Counter("farm_tokens", "Tokens trained, per customer.", tag_keys=("customer",))
        self.finished = Counter("farm_jobs_finished", "Attempts ended, by outcome.", tag_keys=("customer", "outcome"))


class Scheduler:
    """The actor body (wrapped with ray.remote by `start`). See the module docstring."""

    def __init__(self, config: dict) -> None:
        self.cfg = SchedulerConfig(**config)
        self.owner = f"{self.cfg.namespace}/{self.cfg.name}/{uuid.uuid4().hex[:8]}"
        self.store: JobStore = open_store(self.cfg.db)
        self.inflight: dict[ray.ObjectRef, _Attempt] = {}
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
        return {"owner": self.owner, "slots": self._slots, "running": [a.job_id for a in self.inflight.values()],
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
            if self.inflight and len(self.inflight) >= self._slots:
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
        for job in self.store.cancel_requests(self.owner):
            self._cancel(job)
        self._fill_slots(self._slot_count(now))

    def _fill_slots(self, slots: int) -> None:
        """Start jobs in fair order while slots are free."""
        while len(self.inflight) < slots:
            job = self.store.claim_next(self.owner, lease_ttl=self.cfg.lease_ttl_s,
                                        per_customer_limit=self.cfg.per_customer_limit)
            if job is None:
                break
            self._launch(job)
        # farm.autoscale: ask for training nodes while jobs wait with every slot busy, withdraw as
        # the queue drains (runs on every tick, whichever way the loop ended).
        self._grow.update(self.store, len(self.inflight), slots)

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
        publish (its lease is gone, so `begin_publish` refuses)."""
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
