"""The SQLite job store on a real file: transitions, events, idempotency, fairness, leases, backoff."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from farm.errors import JobNotFound, QueueError
from farm.queue import (
    TRANSITIONS,
    Candidate,
    JobState,
    SQLiteStore,
    check_transition,
    fair_order,
    open_store,
    parse_state,
    pick_next,
)
from tests.queue_runners import make_manifest


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = SQLiteStore(tmp_path / "queue.db", clock=clock)
    yield s
    s.close()


def run_one(store, owner="s1", **kw):
    job = store.claim_next(owner, lease_ttl=10, **kw)
    assert job is not None and job.state is JobState.RUNNING
    return job


def test_lifecycle_table_is_the_only_judge():
    check_transition("j", JobState.QUEUED, JobState.RUNNING)
    for state, allowed in TRANSITIONS.items():
        for target in JobState:
            if target not in allowed:
                with pytest.raises(QueueError, match=f"cannot go from {state.value} to {target.value}"):
                    check_transition("j", state, target)
    with pytest.raises(QueueError, match="unknown job state 'done' \\(allowed: queued, running"):
        parse_state("done")


def test_submit_run_succeed_records_every_transition(store, clock):
    sub = store.submit(make_manifest("acme", "chat", priority=3))
    assert sub.created and sub.job_id.startswith("acme-")
    job = store.get(sub.job_id)
    assert (job.state, job.priority, job.attempts, job.manifest["adapter"]) == (JobState.QUEUED, 3, 0, "chat")
    assert job.manifest_hash == make_manifest("acme", "chat", priority=3).content_hash()
    clock.t += 5
    job = run_one(store)
    assert job.attempts == 1 and job.lease_owner == "s1" and job.lease_expires_at == clock.t + 10
    assert store.record_progress(job.id, job.lease_id, {"step": 1, "total_steps": 2, "loss": 0.5})
    assert store.get(job.id).progress["loss"] == 0.5
    done = store.succeed(job.id, job.lease_id, adapter_ref="acme/chat@v1", accelerator_seconds=7.5, tokens=99)
    assert (done.state, done.adapter_ref, done.accelerator_seconds, done.tokens) == (JobState.SUCCEEDED, "acme/chat@v1", 7.5, 99)
    assert done.lease_owner is None and done.finished_at == clock.t
    ev = store.events(job.id)
    assert [(e.from_state, e.to_state) for e in ev] == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]
    assert ev[1].at == 1005.0 and "attempt 1/3" in ev[1].reason and "acme/chat@v1" in ev[2].reason
    with pytest.raises(QueueError, match="already succeeded"):
        store.request_cancel(job.id)
    with pytest.raises(QueueError, match="only failed or cancelled jobs can be retried"):
        store.retry(job.id)


def test_unknown_job_and_bad_inputs_are_clear(store, tmp_path):
    with pytest.raises(JobNotFound, match="no job with id 'nope'"):
        store.get("nope")
    with pytest.raises(QueueError, match=r"priority: must be -100..100 \(got 101\)"):
        store.submit(make_manifest(), priority=101)
    with pytest.raises(QueueError, match="unsupported queue store URL 'postgres://x'"):
        open_store("postgres://x")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="cannot open the queue database"):
        SQLiteStore(bad)
    assert store.counts()["queued"] == 0


def test_duplicate_submit_returns_the_active_job(store):
    m = make_manifest("acme", "chat")
    first = store.submit(m)
    assert store.submit(make_manifest("acme", "chat")) == type(first)(first.job_id, created=False)
    forced = store.submit(m, force=True).job_id
    assert forced != first.job_id
    assert store.submit(make_manifest("acme", "chat", steps=2)).created  # different content
    assert store.submit(make_manifest("other", "chat")).created  # different customer
    job = run_one(store)
    assert store.submit(m).job_id == job.id  # still running: same id
    assert job.id == first.job_id
    store.succeed(job.id, job.lease_id, adapter_ref=None)
    assert store.submit(m).job_id == forced  # the earliest identical job still active


def test_priority_then_fair_across_customers(store, clock):
    # 6 jobs of 3 customers; a floods first, b and c arrive later.
    ids = {}
    for name, cust, prio in [("a1", "a", 0), ("a2", "a", 0), ("a3", "a", 0), ("b1", "b", 0), ("c1", "c", 5), ("b2", "b", 0)]:
        clock.t += 1
        ids[store.submit(make_manifest(cust, name, priority=prio)).job_id] = name
    positions = store.queue_positions()
    planned = [ids[j] for j in sorted(positions, key=positions.get)]
    got = []
    for _ in range(6):
        clock.t += 1
        job = run_one(store)
        got.append(ids[job.id])
        store.succeed(job.id, job.lease_id, adapter_ref=None)
    assert got == ["c1", "a1", "b1", "a2", "b2", "a3"]
    assert planned == got
    assert store.claim_next("s1", lease_ttl=10) is None


def test_fewest_running_first_and_per_customer_limit(store, clock):
    for i in range(3):
        store.submit(make_manifest("big", f"j{i}"))
    store.submit(make_manifest("small", "j0"))
    first = run_one(store)
    assert first.customer == "big"
    assert run_one(store).customer == "small"
    # big has 1 running; with a limit of 1 nothing else may start.
    assert store.claim_next("s1", lease_ttl=10, per_customer_limit=1) is None
    assert run_one(store, per_customer_limit=2).customer == "big"


def test_fair_order_matches_repeated_pick():
    rng = random.Random(0)
    cands = [Candidate(f"j{i}", f"c{rng.randrange(7)}", rng.choice([0, 0, 1, 5]), i) for i in range(300)]
    running = {"c1": 1, "c3": 2}
    served = {"c2": 5.0, "c4": 1.0}
    expected, pool, served_sim, tick = [], list(cands), dict(served), 5.0
    while pool:
        c = pick_next(pool, running, served_sim)
        pool.remove(c)
        expected.append(c)
        tick += 1
        served_sim[c.customer] = tick
    assert fair_order(cands, running, served) == expected


def test_failures_back_off_exponentially_then_dead_letter(store, clock):
    job_id = store.submit(make_manifest(), max_attempts=3).job_id
    gaps = []
    for attempt in (1, 2, 3):
        job = run_one(store)
        assert job.attempts == attempt
        after = store.fail_attempt(job.id, job.lease_id, "TrainingError: boom", backoff_base=2, backoff_max=60)
        if attempt < 3:
            assert after.state is JobState.RETRYING
            gaps.append(after.next_attempt_at - clock.t)
            assert store.claim_next("s1", lease_ttl=10) is None  # still backing off
            clock.t = after.next_attempt_at
    assert gaps == [2, 4]
    job = store.get(job_id)
    assert job.state is JobState.FAILED and job.last_error == "TrainingError: boom"
    assert "no attempts left" in store.events(job_id)[-1].reason
    again = store.retry(job_id)
    assert again.state is JobState.QUEUED and again.attempts == 0


def test_non_retryable_error_fails_at_once(store):
    store.submit(make_manifest())
    job = run_one(store)
    failed = store.fail_attempt(job.id, job.lease_id, "DataError: no column 'text'", retryable=False)
    assert failed.state is JobState.FAILED and failed.attempts == 1


def test_cancel_waiting_and_running(store, clock):
    waiting = store.submit(make_manifest("a", "w")).job_id
    assert store.request_cancel(waiting).state is JobState.CANCELLED
    assert store.claim_next("s1", lease_ttl=10) is None  # a cancelled job never starts
    store.submit(make_manifest("a", "r"))
    job = run_one(store)
    flagged = store.request_cancel(job.id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert [j.id for j in store.cancel_requests("s1")] == [job.id]
    assert store.cancel_requests("other") == []
    done = store.mark_cancelled(job.id, job.lease_id, "stopped on request")
    assert done.state is JobState.CANCELLED and not done.cancel_requested
    assert store.succeed(job.id, job.lease_id, adapter_ref="a/r@v1") is None  # too late: nothing recorded
    assert store.get(job.id).adapter_ref is None


def test_leases_orphans_and_superseded_attempts(store, clock):
    store.submit(make_manifest("a", "x"))
    store.submit(make_manifest("b", "y"))
    old = run_one(store, owner="sched/1")
    other = run_one(store, owner="sched/1")
    clock.t += 5
    assert store.heartbeat("sched/1", lease_ttl=10) == 2
    assert store.recover_orphans("sched/2") == []  # leases still fresh
    # A restarted scheduler takes over its dead predecessor's jobs at once.
    back = store.recover_orphans("sched/2", takeover=lambda owner: owner == "sched/1")
    assert {j.id for j in back} == {old.id, other.id} and all(j.state is JobState.QUEUED for j in back)
    assert all(j.attempts == 1 for j in back)  # the interrupted attempt counts
    assert "re-queued to resume" in store.events(old.id)[-1].reason
    # The interrupted attempt can no longer write.
    assert not store.record_progress(old.id, old.lease_id, {"step": 9})
    again = run_one(store, owner="sched/2")
    assert again.attempts == 2 and again.lease_id != old.lease_id
    # A lapsed lease is an orphan too; one flagged for cancel ends cancelled.
    store.request_cancel(again.id)
    clock.t += 60
    (gone,) = [j for j in store.recover_orphans("sched/3") if j.id == again.id]
    assert gone.state is JobState.CANCELLED


def test_cancel_with_no_live_scheduler_is_immediate(store, clock):
    store.submit(make_manifest())
    job = run_one(store)
    clock.t += 60  # lease lapsed: nobody would act on a flag
    assert store.request_cancel(job.id).state is JobState.CANCELLED


def _submit_many(path: str, customer: str, n: int) -> list[str]:
    s = SQLiteStore(path)
    return [s.submit(make_manifest(customer, f"j{i}")).job_id for i in range(n)]


def test_several_processes_share_the_file(tmp_path):
    path = str(tmp_path / "shared.db")
    SQLiteStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_submit_many, [(path, f"c{i}", 20) for i in range(3)])
    s = SQLiteStore(path)
    assert s.counts()["queued"] == 60 == len({j for r in results for j in r})
    claimed = set()
    while (job := s.claim_next("x", lease_ttl=10)) is not None:
        claimed.add(job.id)
    assert len(claimed) == 60


def test_an_orphan_that_keeps_killing_its_scheduler_ends_in_the_dead_letter_state(store, clock):
    """Each interrupted attempt counts: after max_attempts the job fails instead of re-running forever."""
    job_id = store.submit(make_manifest(), max_attempts=2).job_id
    for n in (1, 2):
        job = run_one(store, owner=f"sched/{n}")
        assert job.attempts == n
        (back,) = store.recover_orphans(f"sched/{n + 1}", takeover=lambda owner, n=n: owner == f"sched/{n}")
    assert back.state is JobState.FAILED and back.attempts == 2
    assert "interrupted" in back.last_error and "no attempts left" in store.events(job_id)[-1].reason
    assert store.claim_next("sched/9", lease_ttl=10) is None


def test_a_failed_attempt_after_a_cancel_request_ends_cancelled_not_stuck(store):
    """Before: retrying with cancel_requested=1, never picked up nor retryable."""
    job = (store.submit(make_manifest()), run_one(store))[1]
    store.request_cancel(job.id)
    done = store.fail_attempt(job.id, job.lease_id, "TrainingError: killed", accelerator_seconds=3.0, tokens=7)
    assert (done.state, done.cancel_requested, done.accelerator_seconds, done.tokens) == (
        JobState.CANCELLED, False, 3.0, 7)
    assert store.retry(job.id).state is JobState.QUEUED  # and `farm retry` works on it


def test_cancel_before_publish_wins_and_the_attempt_may_not_publish(store, clock):
    job = (store.submit(make_manifest()), run_one(store))[1]
    store.request_cancel(job.id)
    assert store.begin_publish(job.id, job.lease_id) is False
    done = store.mark_cancelled(job.id, job.lease_id, "stopped", accelerator_seconds=2.5, tokens=40)
    assert (done.state, done.accelerator_seconds, done.tokens) == (JobState.CANCELLED, 2.5, 40)


def test_a_job_that_began_publishing_ends_succeeded_with_its_version(store, clock):
    job = (store.submit(make_manifest()), run_one(store))[1]
    assert store.begin_publish(job.id, job.lease_id) is True
    flagged = store.request_cancel(job.id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert "publishing" in store.events(job.id)[-1].reason
    assert store.mark_cancelled(job.id, job.lease_id, "stopped") is None  # the scheduler must not kill it
    done = store.succeed(job.id, job.lease_id, adapter_ref="acme/a@v1")
    assert (done.state, done.adapter_ref) == (JobState.SUCCEEDED, "acme/a@v1")


def test_lapsed_lease_cancel_is_immediate_only_while_nothing_can_publish(store, clock):
    # Not publishing: cancelled at once, and the attempt (if still alive) can no longer publish.
    a = (store.submit(make_manifest()), run_one(store))[1]
    clock.t += 60
    assert store.request_cancel(a.id).state is JobState.CANCELLED
    assert store.begin_publish(a.id, a.lease_id) is False
    # Publishing when its lease lapsed: flagged only; the orphan is re-queued to finish the publish
    # (same version by the catalog's idempotency key) and ends succeeded, never cancelled.
    store.submit(make_manifest("acme", "b"))
    b = run_one(store)
    assert store.begin_publish(b.id, b.lease_id)
    clock.t += 60
    assert store.request_cancel(b.id).state is JobState.RUNNING
    (back,) = store.recover_orphans("sched/2")
    assert back.state is JobState.QUEUED
    again = store.claim_next("sched/2", lease_ttl=10)
    assert again.id == b.id and store.begin_publish(b.id, again.lease_id) is True
    assert store.succeed(b.id, again.lease_id, adapter_ref="acme/b@v1").state is JobState.SUCCEEDED


def test_a_publishing_orphan_gets_one_attempt_past_its_budget_then_fails(store, clock):
    """Re-queued to finish its publish even with no attempts left, but only once: a publish that
    keeps taking its scheduler down ends in the dead-letter state, not in an endless loop."""
    store.submit(make_manifest(), max_attempts=1)
    job = run_one(store)
    assert store.begin_publish(job.id, job.lease_id)
    clock.t += 60
    (back,) = store.recover_orphans("sched/2")
    assert (back.state, back.attempts) == (JobState.QUEUED, 1)
    again = store.claim_next("sched/2", lease_ttl=10)
    assert (again.id, again.attempts) == (job.id, 2)
    clock.t += 60
    (dead,) = store.recover_orphans("sched/3")
    assert dead.state is JobState.FAILED
    assert f"idempotency key {job.id}" in dead.last_error
    assert store.claim_next("sched/3", lease_ttl=10) is None


def test_a_version_1_database_is_upgraded_in_place(tmp_path):
    import sqlite3

    from farm.queue import store as store_mod

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    v2 = store_mod._SCHEMA.replace("    finished_at REAL,\n    pack_key TEXT,\n    pack TEXT\n", "    finished_at REAL\n")
    conn.executescript(v2.replace("    publish_started_at REAL,\n", "") + "PRAGMA user_version = 1;")
    conn.close()
    s = SQLiteStore(path)
    job_id = s.submit(make_manifest()).job_id
    assert s.get(job_id).publish_started_at is None
    assert s.get(job_id).pack is None and s.get(job_id).pack_key is not None  # version 3's columns too
    checked = s.submit_checked(make_manifest("acme", "x"), idempotency=("k", "sha"), record={"a": 1})  # version 4
    assert s.client_record(checked.job_id) == {"a": 1} and s.idempotent("acme", "k") == (checked.job_id, "sha")
    from farm.queue.usage import UsageRow

    s.add_usage([UsageRow("acme", 0, "training", 3)])  # version 5: the usage ledger
    assert s.usage() == [UsageRow("acme", 0, "training", 3)]
    s.close()


def test_submit_checked_admits_atomically_across_store_instances(tmp_path):
    """Two stores on one file (two processes' connections): a quota of 2 with one job queued admits
    exactly one of four racing submits; one idempotency key gives one job; the record is the job's."""
    import threading

    from farm.errors import IdempotencyMismatch, QuotaExceeded

    stores = [SQLiteStore(tmp_path / "q.db") for _ in range(2)]
    stores[0].submit_checked(make_manifest("acme", "first"), max_active=2)

    def race(call) -> list:
        barrier, out = threading.Barrier(4), []

        def run(i: int) -> None:
            barrier.wait()
            try:
                out.append(call(stores[i % 2], i))
            except QueueError as exc:
                out.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    got = race(lambda st, i: st.submit_checked(make_manifest("acme", f"j{i}"), max_active=2, record={"i": i}))
    made = [g for g in got if not isinstance(g, Exception)]
    assert len(made) == 1 and sum(isinstance(g, QuotaExceeded) for g in got) == 3
    assert stores[1].client_record(made[0].job_id)["i"] in range(4)
    got = race(lambda st, i: st.submit_checked(make_manifest("globex", "j"), idempotency=("key", "sha")))
    assert len({g.job_id for g in got}) == 1 and sum(g.created for g in got) == 1
    with pytest.raises(IdempotencyMismatch):
        stores[0].submit_checked(make_manifest("globex", "j"), idempotency=("key", "other"))
    assert len(stores[0].list(customer="globex")) == 1
    assert stores[0].remember("globex", "key", "sha", "globex-failed") == (got[0].job_id, "sha")  # first wins
    for st in stores:
        st.close()


def test_sqlite_store_implements_the_jobstore_protocol():
    """Every method of the JobStore protocol exists on SQLiteStore with the same parameters."""
    import inspect

    from farm.queue import JobStore

    names = [n for n, v in vars(JobStore).items() if callable(v) and not n.startswith("_")]
    assert {"running", "begin_publish", "claim_next", "mark_cancelled"} <= set(names)
    for name in names:
        want = list(inspect.signature(getattr(JobStore, name)).parameters)
        have = list(inspect.signature(getattr(SQLiteStore, name)).parameters)
        assert have == want, (name, have, want)


def test_the_usage_ledger_adds_by_customer_hour_and_kind_and_sums_with_job_costs(store, clock):
    """Usage outside jobs (the Tinker API's): rows add up per customer, hour, source and kind; read back by
    customer and hour window; beside each customer's job costs (every attempt) as `farm status` shows them."""
    from farm.queue.usage import UsageRow, customer_costs

    with pytest.raises(ValueError, match="usage kind 'tokens': expected one of training"):
        UsageRow("acme", 3600, "tokens", 1)
    with pytest.raises(ValueError, match="not the start of a UTC hour"):
        UsageRow("acme", 3601, "training", 1)
    store.add_usage([UsageRow("acme", 3600, "training", 10, 1.5), UsageRow("acme", 7200, "sampling_sample", 4)])
    store.add_usage([UsageRow("acme", 3600, "training", 5, 0.5), UsageRow("globex", 3600, "checkpoint", 2)])
    store.add_usage([])
    assert store.usage(customer="acme") == [UsageRow("acme", 3600, "training", 15, 2.0),
                                            UsageRow("acme", 7200, "sampling_sample", 4)]
    assert [r.customer for r in store.usage(start=3600, end=7200)] == ["acme", "globex"]
    assert store.usage(source="jobs") == []
    store.submit(make_manifest("acme", "chat"))
    job = run_one(store)
    store.succeed(job.id, job.lease_id, adapter_ref="acme/chat@v1", accelerator_seconds=7.5, tokens=99)
    costs = customer_costs(store.job_costs(), store.usage())
    assert list(costs) == ["acme", "globex"]
    acme = costs["acme"]
    assert (acme.jobs, acme.job_accelerator_seconds, acme.tinker_accelerator_seconds, acme.accelerator_seconds) == (1, 7.5, 2.0, 9.5)
    assert (acme.job_tokens, acme.tinker_training_tokens, acme.training_tokens, acme.tinker_sampled_tokens) == (99, 15, 114, 4)
    assert costs["globex"].tinker_checkpoints == 2 and costs["globex"].jobs == 0
