"""The durable job store: SQLite in WAL mode, safe to share between processes (CLI, scheduler actor,
trainer tasks on the same host). Every state change goes through `_transition`, which checks the
lifecycle table and writes an event row in the same transaction.

`JobStore` is the interface the scheduler and CLI use; a server database (for a multi-node head in
HA) implements the same methods.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from farm.errors import IdempotencyMismatch, JobNotFound, QueueError, QuotaExceeded
from farm.queue.fairness import Candidate, fair_order, pick_next
from farm.queue.job import Event, Job, Submitted
from farm.queue.lifecycle import ACTIVE, TERMINAL, JobState, check_transition, retry_delay
from farm.queue.usage import UsageRow

if TYPE_CHECKING:
    from farm.manifest import Manifest

DEFAULT_MAX_ATTEMPTS = 3
SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    customer TEXT NOT NULL,
    adapter TEXT NOT NULL,
    manifest TEXT NOT NULL,
    manifest_hash TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_attempt_at REAL,
    last_error TEXT,
    progress TEXT,
    accelerator_seconds REAL NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    adapter_ref TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    publish_started_at REAL,
    lease_owner TEXT,
    lease_id TEXT,
    lease_expires_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    first_started_at REAL,
    started_at REAL,
    finished_at REAL,
    pack_key TEXT,
    pack TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, customer);
CREATE INDEX IF NOT EXISTS jobs_dedup ON jobs(customer, adapter, manifest_hash);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS customers (
    customer TEXT PRIMARY KEY,
    last_served_at REAL,
    dispatched INTEGER NOT NULL DEFAULT 0
);
"""
# A submitter's own record of a job (the fine-tuning API's job object), written in the submit's
# transaction, and the idempotency keys of submit requests: API replicas share them through here.
_CLIENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_records (
    job_id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS client_records_customer ON client_records(customer);
CREATE TABLE IF NOT EXISTS idempotency (
    customer TEXT NOT NULL,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (customer, key)
);
"""

# Usage outside jobs (farm.queue.usage: the Tinker API's), one row per customer, hour, source and kind.
_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    customer TEXT NOT NULL,
    hour INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL DEFAULT 0,
    accelerator_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (customer, hour, source, kind)
);
"""

# A job flagged for cancel runs again only to finish a publish it had begun (see begin_publish).
_ELIGIBLE = ("(cancel_requested = 0 OR publish_started_at IS NOT NULL) "
             "AND (state = 'queued' OR (state = 'retrying' AND next_attempt_at <= ?))")
# Schema upgrades, from version N-1 to N.
# 3: packed training (farm.pack_key): the job's compatibility key (NULL: runs alone; jobs queued
# before the upgrade run alone) and the pack it runs or ran in.
# 4: submit admission across processes (submit_checked): client records and idempotency keys.
# 5: the usage ledger of work outside jobs (farm.queue.usage).
_MIGRATIONS = {2: "ALTER TABLE jobs ADD COLUMN publish_started_at REAL;",
               3: "ALTER TABLE jobs ADD COLUMN pack_key TEXT; ALTER TABLE jobs ADD COLUMN pack TEXT;",
               4: _CLIENT_SCHEMA,
               5: _USAGE_SCHEMA}


class JobStore(Protocol):
    """What the scheduler and the CLI need from a job store."""

    def submit(self, manifest: Manifest, *, priority: int | None = None, max_attempts: int = ...,
               force: bool = False) -> Submitted: ...
    def submit_checked(self, manifest: Manifest, *, max_attempts: int = ..., max_active: int | None = None,
                       idempotency: tuple[str, str] | None = None,
                       record: dict[str, Any] | None = None) -> Submitted: ...
    def idempotent(self, customer: str, key: str) -> tuple[str, str] | None: ...
    def remember(self, customer: str, key: str, request_sha256: str, job_id: str) -> tuple[str, str]: ...
    def client_record(self, job_id: str) -> dict[str, Any] | None: ...
    def client_records(self, customer: str | None = None) -> dict[str, dict[str, Any]]: ...
    def get(self, job_id: str) -> Job: ...
    def list(self, *, customer: str | None = None, state: JobState | None = None) -> list[Job]: ...
    def events(self, job_id: str) -> list[Event]: ...
    def claim_next(self, owner: str, *, lease_ttl: float, per_customer_limit: int | None = None,
                   pack_key: str | None = None) -> Job | None: ...
    def set_pack(self, job_id: str, lease_id: str, pack: str | None, reason: str) -> bool: ...
    def heartbeat(self, owner: str, *, lease_ttl: float) -> int: ...
    def record_progress(self, job_id: str, lease_id: str, progress: dict[str, Any]) -> bool: ...
    def succeed(self, job_id: str, lease_id: str, *, adapter_ref: str | None, accelerator_seconds: float = 0.0,
                tokens: int = 0) -> Job | None: ...
    def fail_attempt(self, job_id: str, lease_id: str, error: str, *, retryable: bool = True,
                     backoff_base: float = 5.0, backoff_max: float = 300.0, accelerator_seconds: float = 0.0,
                     tokens: int = 0) -> Job | None: ...
    def begin_publish(self, job_id: str, lease_id: str) -> bool: ...
    def request_cancel(self, job_id: str, reason: str = ...) -> Job: ...
    def mark_cancelled(self, job_id: str, lease_id: str, reason: str, *, accelerator_seconds: float = 0.0,
                       tokens: int = 0) -> Job | None: ...
    def running(self, owner: str | None = None) -> list[Job]: ...
    def cancel_requests(self, owner: str) -> list[Job]: ...
    def recover_orphans(self, owner: str, *, takeover: Callable[[str], bool] = ...) -> list[Job]: ...
    def retry(self, job_id: str) -> Job: ...
    def counts(self) -> dict[str, int]: ...
    def add_usage(self, rows: Iterable[UsageRow]) -> None: ...
    def usage(self, *, customer: str | None = None, start: float | None = None, end: float | None = None,
              source: str | None = None) -> list[UsageRow]: ...
    def job_costs(self) -> dict[str, dict[str, float]]: ...
    def queue_positions(self) -> dict[str, int]: ...
    def note(self, job_id: str, reason: str) -> None: ...


class SQLiteStore:
    """JobStore on one SQLite file. One connection per instance, guarded by a lock so threads of the
    scheduler actor can share it; other processes coordinate through SQLite's own locking."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL survives crashes
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(
                    f"queue database {self.path} has schema version {version}; this farm knows "
                    f"version {SCHEMA_VERSION} (upgrade farm)"
                )
            if version == 0:
                self._conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} {_CLIENT_SCHEMA} {_USAGE_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version < SCHEMA_VERSION:
                steps = " ".join(_MIGRATIONS[v] for v in range(version + 1, SCHEMA_VERSION + 1))
                self._conn.executescript(f"BEGIN IMMEDIATE; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as exc:
            raise QueueError(f"cannot open the queue database {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    # ---- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes SQLite's write lock up front, so a
        read-then-write (claim, dedup) cannot interleave with another process."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise QueueError(f"queue database {self.path} is busy or unwritable: {exc}") from None
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _row(self, c: sqlite3.Connection, job_id: str) -> Job:
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r} (list jobs with `farm jobs`)")
        return Job.from_row(row)

    def _event(self, c: sqlite3.Connection, job_id: str, from_state: str | None, to_state: str, reason: str) -> None:
        c.execute(
            "INSERT INTO events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, self.clock(), from_state, to_state, reason),
        )

    def _transition(self, c: sqlite3.Connection, job: Job, target: JobState, reason: str, **fields: Any) -> Job:
        """The only place a job's state changes: check the table, update, record the event."""
        check_transition(job.id, job.state, target)
        now = self.clock()
        fields = {"state": target.value, "updated_at": now, **fields}
        if target in TERMINAL:
            fields.setdefault("finished_at", now)
        if target is not JobState.RUNNING:
            fields.update(lease_owner=None, lease_id=None, lease_expires_at=None)
        sets = ", ".join(f"{k} = ?" for k in fields)
        c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job.id))
        self._event(c, job.id, job.state.value, target.value, reason)
        return self._row(c, job.id)

    def _leased(self, c: sqlite3.Connection, job_id: str, lease_id: str) -> Job | None:
        """The job if `lease_id` still holds it (running), else None: a superseded attempt."""
        job = self._row(c, job_id)
        if job.state is not JobState.RUNNING or job.lease_id != lease_id:
            return None
        return job

    # ---- submit and read ----------------------------------------------------------------------

    def submit(
        self,
        manifest: Manifest,
        *,
        priority: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        force: bool = False,
    ) -> Submitted:
        """Enqueue a validated manifest. Without `force`, an identical manifest for the same
        customer/adapter that is still queued, running or retrying returns that job's id."""
        if not 1 <= max_attempts <= 100:
            raise QueueError(f"max_attempts: must be 1..100 (got {max_attempts})")
        prio = manifest.priority if priority is None else priority
        if not -100 <= prio <= 100:
            raise QueueError(f"priority: must be -100..100 (got {prio})")
        from farm.pack_key import pack_key

        digest = manifest.content_hash()
        key = pack_key(manifest)
        doc = json.dumps(manifest.model_dump(mode="json"), sort_keys=True)
        with self._tx() as c:
            if not force:
                active = ", ".join(f"'{s.value}'" for s in ACTIVE)
                row = c.execute(
                    f"SELECT id FROM jobs WHERE customer = ? AND adapter = ? AND manifest_hash = ? "
                    f"AND state IN ({active}) ORDER BY seq LIMIT 1",
                    (manifest.customer, manifest.adapter, digest),
                ).fetchone()
                if row is not None:
                    return Submitted(row["id"], created=False)
            job_id = self._insert(c, manifest, doc, digest, key, prio, max_attempts)
            return Submitted(job_id, created=True)

    def _insert(self, c: sqlite3.Connection, manifest: Manifest, doc: str, digest: str, key: str | None,
                prio: int, max_attempts: int) -> str:
        now = self.clock()
        for _ in range(10):
            # The customer in the id puts it in every Ray dashboard name derived from the id.
            job_id = f"{manifest.customer}-{secrets.token_hex(4)}"
            try:
                c.execute(
                    "INSERT INTO jobs (id, customer, adapter, manifest, manifest_hash, priority, state, "
                    "max_attempts, created_at, updated_at, pack_key) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, manifest.customer, manifest.adapter, doc, digest, prio, max_attempts, now, now, key),
                )
                break
            except sqlite3.IntegrityError:
                continue
        else:  # pragma: no cover - 10 collisions of 32 random bits
            raise QueueError("could not allocate a unique job id")
        self._event(c, job_id, None, JobState.QUEUED.value, f"submitted with priority {prio}")
        return job_id

    def submit_checked(self, manifest: Manifest, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                       max_active: int | None = None, idempotency: tuple[str, str] | None = None,
                       record: dict[str, Any] | None = None) -> Submitted:
        """Enqueue with the admission checks in the insert's own write transaction, so processes
        sharing this database (API replicas) cannot race past them. `idempotency` = (key, request
        digest): a key seen before returns that job (created=False; IdempotencyMismatch when its
        digest differs). `max_active` caps the customer's queued/running/retrying jobs
        (QuotaExceeded). `record`, the submitter's own view of the job, is stored with it, never
        without it (read it back with `client_record`). Identical manifests are not merged."""
        if not 1 <= max_attempts <= 100:
            raise QueueError(f"max_attempts: must be 1..100 (got {max_attempts})")
        from farm.pack_key import pack_key

        doc = json.dumps(manifest.model_dump(mode="json"), sort_keys=True)
        with self._tx() as c:
            if idempotency is not None:
                seen = self._idempotent(c, manifest.customer, idempotency[0])
                if seen is not None:
                    if seen[1] != idempotency[1]:
                        raise IdempotencyMismatch("this idempotency key was used with a different request")
                    return Submitted(seen[0], created=False)
            if max_active is not None:
                terminal = ", ".join(f"'{s.value}'" for s in TERMINAL)
                n = c.execute(f"SELECT COUNT(*) FROM jobs WHERE customer = ? AND state NOT IN ({terminal})",
                              (manifest.customer,)).fetchone()[0]
                if n >= max_active:
                    raise QuotaExceeded(manifest.customer, n, max_active)
            job_id = self._insert(c, manifest, doc, manifest.content_hash(), pack_key(manifest), manifest.priority,
                                  max_attempts)
            if record is not None:
                c.execute("INSERT INTO client_records (job_id, customer, record) VALUES (?, ?, ?)",
                          (job_id, manifest.customer, json.dumps(record, sort_keys=True)))
            if idempotency is not None:
                c.execute("INSERT INTO idempotency (customer, key, request_sha256, job_id, created_at) "
                          "VALUES (?, ?, ?, ?, ?)", (manifest.customer, *idempotency, job_id, self.clock()))
            return Submitted(job_id, created=True)

    def _idempotent(self, c: sqlite3.Connection, customer: str, key: str) -> tuple[str, str] | None:
        row = c.execute("SELECT job_id, request_sha256 FROM idempotency WHERE customer = ? AND key = ?",
                        (customer, key)).fetchone()
        return None if row is None else (row["job_id"], row["request_sha256"])

    def idempotent(self, customer: str, key: str) -> tuple[str, str] | None:
        """(job id, request digest) an idempotency key of the customer was first used for, or None."""
        with self._lock:
            return self._idempotent(self._conn, customer, key)

    def remember(self, customer: str, key: str, request_sha256: str, job_id: str) -> tuple[str, str]:
        """Record a key for a job made without a queue row (one that failed validation); the first
        writer wins and its (job id, digest) is returned."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO idempotency (customer, key, request_sha256, job_id, created_at) "
                      "VALUES (?, ?, ?, ?, ?)", (customer, key, request_sha256, job_id, self.clock()))
            got = self._idempotent(c, customer, key)
        assert got is not None
        return got

    def client_record(self, job_id: str) -> dict[str, Any] | None:
        """The record `submit_checked` stored with a job, or None."""
        with self._lock:
            row = self._conn.execute("SELECT record FROM client_records WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else json.loads(row["record"])

    def client_records(self, customer: str | None = None) -> dict[str, dict[str, Any]]:
        """Every stored client record by job id (of one customer, or of all)."""
        sql, args = "SELECT job_id, record FROM client_records", ()
        if customer is not None:
            sql, args = sql + " WHERE customer = ?", (customer,)
        with self._lock:
            return {r["job_id"]: json.loads(r["record"]) for r in self._conn.execute(sql, args)}

    def get(self, job_id: str) -> Job:
        with self._lock:
            return self._row(self._conn, job_id)

    def list(self, *, customer: str | None = None, state: JobState | None = None) -> list[Job]:
        where, args = [], []
        if customer:
            where.append("customer = ?")
            args.append(customer)
        if state:
            where.append("state = ?")
            args.append(JobState(state).value)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        with self._lock:
            return [Job.from_row(r) for r in self._conn.execute(sql, args)]

    def events(self, job_id: str) -> list[Event]:
        with self._lock:
            self._row(self._conn, job_id)
            rows = self._conn.execute(
                "SELECT job_id, at, from_state, to_state, reason FROM events WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        return [Event(**dict(r)) for r in rows]

    def note(self, job_id: str, reason: str) -> None:
        """Record an event that changes no state (e.g. 'waiting for a training node')."""
        with self._tx() as c:
            job = self._row(c, job_id)
            self._event(c, job_id, job.state.value, job.state.value, reason)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s.value: 0 for s in JobState}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    # ---- usage outside jobs, and each customer's job costs (farm status) ----------------------

    def add_usage(self, rows: Iterable[UsageRow]) -> None:
        """Add rows to the ledger in one transaction (a row adds to its customer's hour, source and kind)."""
        rows = list(rows)
        if not rows:
            return
        with self._tx() as c:
            c.executemany(
                "INSERT INTO usage (customer, hour, source, kind, amount, accelerator_seconds) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (customer, hour, source, kind) DO UPDATE SET amount = amount + excluded.amount, "
                "accelerator_seconds = accelerator_seconds + excluded.accelerator_seconds",
                [(r.customer, r.hour, r.source, r.kind, int(r.amount), float(r.accelerator_seconds)) for r in rows])

    def usage(self, *, customer: str | None = None, start: float | None = None, end: float | None = None,
              source: str | None = None) -> list[UsageRow]:
        """Ledger rows (of one customer, of one source) whose hour starts in [start, end), by hour."""
        where, args = [], []
        for cond, value in (("customer = ?", customer), ("hour >= ?", start), ("hour < ?", end), ("source = ?", source)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = ("SELECT * FROM usage" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY hour, customer, source, kind")
        with self._lock:
            return [UsageRow(r["customer"], r["hour"], r["kind"], r["amount"], r["accelerator_seconds"], r["source"])
                    for r in self._conn.execute(sql, args)]

    def job_costs(self) -> dict[str, dict[str, float]]:
        """Per customer: its jobs, their accelerator-seconds and tokens (every attempt charged)."""
        with self._lock:
            rows = self._conn.execute("SELECT customer, COUNT(*) AS jobs, SUM(accelerator_seconds) AS s, "
                                      "SUM(tokens) AS t FROM jobs GROUP BY customer ORDER BY customer").fetchall()
        return {r["customer"]: {"jobs": r["jobs"], "accelerator_seconds": float(r["s"] or 0.0), "tokens": int(r["t"] or 0)}
                for r in rows}

    def _fairness_inputs(self, c: sqlite3.Connection) -> tuple[dict[str, int], dict[str, float]]:
        running = {
            r["customer"]: r["n"]
            for r in c.execute("SELECT customer, COUNT(*) AS n FROM jobs WHERE state = 'running' GROUP BY customer")
        }
        served = {r["customer"]: r["last_served_at"] for r in c.execute("SELECT * FROM customers")}
        return running, served

    def queue_positions(self) -> dict[str, int]:
        """Each waiting job's place in the dispatch order (1 = next), ignoring retry backoff."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, customer, priority, seq FROM jobs WHERE (cancel_requested = 0 OR publish_started_at IS NOT NULL) "
                "AND state IN ('queued', 'retrying')"
            ).fetchall()
            running, served = self._fairness_inputs(self._conn)
        order = fair_order([Candidate(r["id"], r["customer"], r["priority"], r["seq"]) for r in rows], running, served)
        return {c.job_id: i for i, c in enumerate(order, 1)}

    # ---- the scheduler's side -----------------------------------------------------------------

    def claim_next(self, owner: str, *, lease_ttl: float, per_customer_limit: int | None = None,
                   pack_key: str | None = None) -> Job | None:
        """Move the next job in fair order to running under a lease held by `owner`; None if none.
        With `pack_key`: the next, in the same order, among the jobs of that compatibility key (a
        running pack with room admitting one)."""
        with self._tx() as c:
            now = self.clock()
            where, args = _ELIGIBLE, [now]
            if pack_key is not None:
                where, args = f"({_ELIGIBLE}) AND pack_key = ?", [now, pack_key]
            rows = c.execute(f"SELECT id, customer, priority, seq FROM jobs WHERE {where}", args).fetchall()
            if not rows:
                return None
            running, served = self._fairness_inputs(c)
            cands = [Candidate(r["id"], r["customer"], r["priority"], r["seq"]) for r in rows]
            chosen = pick_next(cands, running, served, per_customer_limit)
            if chosen is None:
                return None
            job = self._row(c, chosen.job_id)
            attempt = job.attempts + 1
            c.execute(
                "INSERT INTO customers (customer, last_served_at, dispatched) VALUES (?, ?, 1) "
                "ON CONFLICT(customer) DO UPDATE SET last_served_at = excluded.last_served_at, "
                "dispatched = dispatched + 1",
                (job.customer, now),
            )
            return self._transition(
                c, job, JobState.RUNNING, f"attempt {attempt}/{job.max_attempts} started by {owner}",
                attempts=attempt, lease_owner=owner, lease_id=secrets.token_hex(8),
                lease_expires_at=now + lease_ttl, started_at=now,
                first_started_at=job.first_started_at or now, next_attempt_at=None, pack=None,
            )

    def set_pack(self, job_id: str, lease_id: str, pack: str | None, reason: str) -> bool:
        """Record the pack the attempt holding `lease_id` runs in (None: it left its pack) with an
        event (`reason`, e.g. "joined pack X"). False when that attempt no longer holds the job."""
        with self._tx() as c:
            job = self._leased(c, job_id, lease_id)
            if job is None:
                return False
            if pack is not None:
                c.execute("UPDATE jobs SET pack = ? WHERE id = ?", (pack, job_id))
            self._event(c, job_id, job.state.value, job.state.value, reason)
            return True

    def heartbeat(self, owner: str, *, lease_ttl: float) -> int:
        """Extend the leases of all jobs `owner` runs; returns how many."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE state = 'running' AND lease_owner = ?",
                (self.clock() + lease_ttl, owner),
            )
            return cur.rowcount

    def record_progress(self, job_id: str, lease_id: str, progress: dict[str, Any]) -> bool:
        """Store the latest progress of the attempt holding `lease_id`. False when that attempt no
        longer holds the job (cancelled, or superseded after its scheduler died)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND lease_id = ? AND state = 'running'",
                (json.dumps(progress, default=float), self.clock(), job_id, lease_id),
            )
            return cur.rowcount == 1

    def succeed(self, job_id: str, lease_id: str, *, adapter_ref: str | None, accelerator_seconds: float = 0.0,
                tokens: int = 0) -> Job | None:
        with self._tx() as c:
            job = self._leased(c, job_id, lease_id)
            if job is None:
                return None
            where = f" as {adapter_ref}" if adapter_ref else ""
            return self._transition(
                c, job, JobState.SUCCEEDED, f"attempt {job.attempts} succeeded; published{where}",
                adapter_ref=adapter_ref, accelerator_seconds=job.accelerator_seconds + accelerator_seconds,
                tokens=job.tokens + int(tokens), last_error=None,
            )

    def fail_attempt(
        self,
        job_id: str,
        lease_id: str,
        error: str,
        *,
        retryable: bool = True,
        backoff_base: float = 5.0,
        backoff_max: float = 300.0,
        accelerator_seconds: float = 0.0,
        tokens: int = 0,
    ) -> Job | None:
        """Record a failed attempt: `retrying` with exponential backoff while attempts remain and the
        error is retryable, else `failed` (the dead-letter state) with the error kept."""
        with self._tx() as c:
            job = self._leased(c, job_id, lease_id)
            if job is None:
                return None
            cost = dict(accelerator_seconds=job.accelerator_seconds + accelerator_seconds,
                        tokens=job.tokens + int(tokens), last_error=error)
            head = f"attempt {job.attempts}/{job.max_attempts} failed: {error}"
            if job.cancel_requested and job.publish_started_at is None:
                # Nobody wants another attempt, and this one published nothing: the cancel is done.
                return self._transition(c, job, JobState.CANCELLED, f"{head}; cancel was requested",
                                        cancel_requested=0, **cost)
            if not retryable or job.attempts >= job.max_attempts:
                why = "not retryable" if not retryable else "no attempts left"
                return self._transition(c, job, JobState.FAILED, f"{head} ({why})", **cost)
            delay = retry_delay(job.attempts, backoff_base, backoff_max)
            return self._transition(
                c, job, JobState.RETRYING, f"{head}; retry in {delay:g} s",
                next_attempt_at=self.clock() + delay, **cost,
            )

    def begin_publish(self, job_id: str, lease_id: str) -> bool:
        """The attempt holding `lease_id` is about to publish. True: go ahead (from now on a cancel
        no longer stops the job; it ends succeeded with its version). False: do not publish (the
        attempt lost its lease, or a cancel came first). A job that had begun publishing in an
        earlier attempt may always finish (the catalog's idempotency key makes it the same version)."""
        with self._tx() as c:
            job = self._leased(c, job_id, lease_id)
            if job is None or (job.lease_expires_at or 0) < self.clock():
                return False
            if job.publish_started_at is not None:
                return True
            if job.cancel_requested:
                return False
            c.execute("UPDATE jobs SET publish_started_at = ?, updated_at = ? WHERE id = ?",
                      (self.clock(), self.clock(), job_id))
            self._event(c, job_id, job.state.value, job.state.value, f"attempt {job.attempts} publishing")
            return True

    def request_cancel(self, job_id: str, reason: str = "cancelled by user") -> Job:
        """Cancel a job. Waiting jobs are cancelled at once. A running one is flagged for its
        scheduler to stop; one whose lease lapsed (no live scheduler renews it) is cancelled at once
        unless it had begun publishing, since its attempt can no longer pass `begin_publish`.
        A job that had begun publishing ends succeeded, never cancelled with a live version."""
        with self._tx() as c:
            job = self._row(c, job_id)
            if job.state in TERMINAL:
                raise QueueError(f"job {job_id} is already {job.state.value}; there is nothing to cancel")
            publishing = job.publish_started_at is not None
            live = job.state is JobState.RUNNING and (job.lease_expires_at or 0) >= self.clock()
            if publishing or live:
                if not job.cancel_requested:
                    c.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                              (self.clock(), job_id))
                    note = " (it is publishing: it will end succeeded)" if publishing else ""
                    self._event(c, job_id, job.state.value, job.state.value, f"cancel requested: {reason}{note}")
                return self._row(c, job_id)
            return self._transition(c, job, JobState.CANCELLED, reason, cancel_requested=0)

    def mark_cancelled(self, job_id: str, lease_id: str, reason: str, *, accelerator_seconds: float = 0.0,
                       tokens: int = 0) -> Job | None:
        """The scheduler is about to stop the attempt holding `lease_id` on request: cancelled now,
        charged the attempt's cost. None (and the attempt must be left to finish) when the attempt no
        longer holds the job or has begun publishing."""
        with self._tx() as c:
            job = self._leased(c, job_id, lease_id)
            if job is None or job.publish_started_at is not None:
                return None
            return self._transition(c, job, JobState.CANCELLED, reason, cancel_requested=0,
                                    accelerator_seconds=job.accelerator_seconds + accelerator_seconds,
                                    tokens=job.tokens + int(tokens))

    def cancel_requests(self, owner: str) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE state = 'running' AND cancel_requested = 1 AND lease_owner = ?", (owner,)
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def running(self, owner: str | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE state = 'running'", ()
        if owner is not None:
            sql, args = sql + " AND lease_owner = ?", (owner,)
        with self._lock:
            return [Job.from_row(r) for r in self._conn.execute(sql + " ORDER BY seq", args)]

    def recover_orphans(self, owner: str, *, takeover: Callable[[str], bool] = lambda _owner: False) -> list[Job]:
        """Running jobs whose holder is gone (lease lapsed, or `takeover(lease_owner)` says it is a
        dead predecessor of `owner`). The interrupted attempt counts against `max_attempts` (a job
        that keeps taking its scheduler down must not re-run forever): with attempts left the job is
        re-queued to resume from its last checkpoint, else it fails (the dead-letter state). Flagged
        for cancel, it is cancelled instead, unless it had begun publishing: then it is re-queued to
        finish the publish (the same version, by the catalog's idempotency key), with one attempt
        past `max_attempts` at most, after which it fails too."""
        out = []
        with self._tx() as c:
            now = self.clock()
            rows = c.execute("SELECT * FROM jobs WHERE state = 'running' AND lease_owner IS NOT ?", (owner,))
            for job in [Job.from_row(r) for r in rows.fetchall()]:
                if not ((job.lease_expires_at or 0) < now or takeover(job.lease_owner or "")):
                    continue
                gone = (f"attempt {job.attempts}/{job.max_attempts} interrupted: "
                        f"its scheduler {job.lease_owner} is gone")
                publishing = job.publish_started_at is not None
                if job.cancel_requested and not publishing:
                    out.append(self._transition(c, job, JobState.CANCELLED, f"{gone}; cancel was requested",
                                                cancel_requested=0))
                elif job.attempts >= job.max_attempts and not publishing:
                    out.append(self._transition(c, job, JobState.FAILED, f"{gone} (no attempts left)",
                                                last_error=gone))
                elif publishing and job.attempts > job.max_attempts:
                    # It was given one attempt past its budget to finish the publish and lost that
                    # too: it must not re-run forever. The catalog's idempotency key is the job id.
                    why = (f"{gone} (no attempts left; it had begun publishing: a complete version, if "
                           f"any, is in the catalog under idempotency key {job.id})")
                    out.append(self._transition(c, job, JobState.FAILED, why, last_error=why, cancel_requested=0))
                else:
                    out.append(self._transition(c, job, JobState.QUEUED,
                                                f"{gone}; re-queued to resume from its last checkpoint"))
        return out

    def retry(self, job_id: str) -> Job:
        """`farm retry`: a failed or cancelled job goes back to the queue with a fresh attempt budget."""
        with self._tx() as c:
            job = self._row(c, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise QueueError(f"job {job_id} is {job.state.value}; only failed or cancelled jobs can be retried")
            return self._transition(
                c, job, JobState.QUEUED, f"re-queued by retry after {job.attempts} attempt(s)",
                attempts=0, next_attempt_at=None, cancel_requested=0, finished_at=None, publish_started_at=None,
            )


def open_store(url: str | Path | None = None, **kwargs: Any) -> SQLiteStore:
    """The job store at `url`: a path or sqlite:///path; default `farm.settings.queue_db_path()`."""
    if url is None:
        from farm.settings import queue_db_path

        return SQLiteStore(queue_db_path(), **kwargs)
    text = str(url)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text[len("sqlite://"):], **kwargs)
    if "://" in text:
        raise QueueError(f"unsupported queue store URL {text!r} (supported: a file path or sqlite:///path)")
    return SQLiteStore(text, **kwargs)
