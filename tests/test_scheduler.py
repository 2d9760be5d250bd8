"""The scheduler actor on the shared local Ray cluster with a real SQLite queue, driving small real
runner functions (tests/queue_runners.py). Each test gets its own FARM_HOME and actor name and kills
its actor at the end."""

from __future__ import annotations

import uuid

import pytest

from farm import scheduler
from farm.queue import JobState, SQLiteStore
from tests.queue_runners import make_manifest, pid_alive, pid_of, read_trace
from tests.waiting import wait_for

pytestmark = pytest.mark.ray


@pytest.fixture
def farm(ray_cluster, farm_home):
    """A scheduler factory: start(runner=..., **config) -> (actor, store). Kills the actor after."""
    import ray

    name = f"test-sched-{uuid.uuid4().hex[:6]}"
    store = SQLiteStore(farm_home / "queue.db")
    started = []

    def start(runner: str, **cfg):
        cfg = {"slots": 1, "poll_s": 0.05, "heartbeat_s": 0.5, **cfg}
        actor = scheduler.start(scheduler.SchedulerConfig(name=name, namespace="farm-tests",
                                                          runner=f"tests.queue_runners:{runner}", **cfg))
        started.append(actor)
        return actor

    yield start, store, name
    for actor in started:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    store.close()


def state_of(store, job_id):
    return store.get(job_id).state


def test_six_jobs_three_customers_run_in_priority_then_fair_order(farm, farm_home):
    start, store, _ = farm
    plan = [("a", "a1", 0), ("a", "a2", 0), ("a", "a3", 0), ("b", "b1", 0), ("c", "c1", 5), ("b", "b2", 0)]
    names = {}
    for customer, adapter, prio in plan:
        names[store.submit(make_manifest(customer, adapter, priority=prio)).job_id] = adapter
    start("record")
    wait_for(lambda: store.counts()["succeeded"] == 6, timeout=60)
    ran = [names[j] for j in read_trace(farm_home, "start.log")]
    assert ran == ["c1", "a1", "b1", "a2", "b2", "a3"]
    # One attempt each, each visible in Ray under its job id (which starts with the customer).
    tasks = read_trace(farm_home, "tasks.log")
    assert sorted(tasks) == sorted(f"farm-{j}" for j in names)
    job = store.get(next(iter(names)))
    assert job.attempts == 1 and job.adapter_ref.endswith("@v1") and job.tokens == 10
    log = (farm_home / "logs" / "jobs" / f"{job.id}.log").read_text()
    assert "attempt 1/3 dispatched as Ray task farm-" in log and "step 1/1" in log


def test_cancel_running_job_frees_the_slot_and_publishes_nothing(farm, farm_home):
    start, store, name = farm
    long = store.submit(make_manifest("a", "long", steps=300, ms_per_step=100)).job_id
    start("record")
    wait_for(lambda: store.get(long).progress.get("step", 0) >= 2)
    pid = pid_of(farm_home, long)
    store.request_cancel(long)
    scheduler.wake(name, "farm-tests")
    wait_for(lambda: state_of(store, long) is JobState.CANCELLED, timeout=30)
    # The attempt's process is gone (killed), so nothing can publish after the fact.
    wait_for(lambda: not pid_alive(pid), timeout=30, what=f"the cancelled attempt's process {pid} to end")
    assert not (farm_home / "published" / long).exists()
    job = store.get(long)
    assert job.accelerator_seconds == 0.5 * job.progress["step"], "charged what it ran, like any attempt"
    # The slot is free: the next job runs to the end.
    nxt = store.submit(make_manifest("b", "next")).job_id
    scheduler.wake(name, "farm-tests")
    wait_for(lambda: state_of(store, nxt) is JobState.SUCCEEDED, timeout=30)
    assert not (farm_home / "published" / long).exists()
    assert [e.to_state for e in store.events(long)][-1] == "cancelled"


def test_cancel_while_publishing_ends_succeeded_with_the_version_recorded(farm, farm_home):
    """A cancel that arrives once the attempt has begun publishing must not kill it half-way and
    record "nothing published": the job ends succeeded, its version in the queue."""
    start, store, name = farm
    job_id = store.submit(make_manifest("a", "pub")).job_id
    start("publish_after_cancel")
    wait_for(lambda: job_id in read_trace(farm_home, "publishing.log"), timeout=60)
    store.request_cancel(job_id)
    scheduler.wake(name, "farm-tests")
    wait_for(lambda: store.get(job_id).done, timeout=60)
    job = store.get(job_id)
    assert (job.state, job.adapter_ref) == (JobState.SUCCEEDED, "a/pub@v1")
    assert read_trace(farm_home, "publish.log") == [job_id]


def test_scheduler_killed_mid_job_the_job_finishes_once(farm, farm_home):
    import ray

    start, store, _ = farm
    job_id = store.submit(make_manifest("a", "crashy", steps=40, ms_per_step=100)).job_id
    actor = start("record")
    first_owner = ray.get(actor.ping.remote())["owner"]
    wait_for(lambda: store.get(job_id).progress.get("step", 0) >= 3)
    ray.kill(actor, no_restart=False)  # Ray restarts it; the new incarnation re-queues the orphan
    wait_for(lambda: state_of(store, job_id) is JobState.SUCCEEDED, timeout=60)
    assert ray.get(actor.ping.remote())["owner"] != first_owner
    assert read_trace(farm_home, "start.log") == [job_id, job_id]  # interrupted, then re-run
    assert read_trace(farm_home, "publish.log") == [job_id]  # published once
    job = store.get(job_id)
    assert job.attempts == 2  # the interrupted attempt counts towards max_attempts
    assert any("interrupted" in e.reason for e in store.events(job_id))


def test_always_failing_job_fails_after_n_attempts_with_growing_gaps(farm, farm_home):
    start, store, _ = farm
    job_id = store.submit(make_manifest("a", "nan"), max_attempts=3).job_id
    start("always_fail", backoff_base_s=0.5, backoff_max_s=10)
    wait_for(lambda: state_of(store, job_id) is JobState.FAILED, timeout=60)
    starts = [float(line.split("@")[1]) for line in read_trace(farm_home, "start.log")]
    assert len(starts) == 3
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[1] > gaps[0], gaps
    job = store.get(job_id)
    assert job.attempts == 3 and "TrainingError" in job.last_error and "loss went NaN" in job.last_error
    states = [e.to_state for e in store.events(job_id)]
    assert states == ["queued", "running", "retrying", "running", "retrying", "running", "failed"]
