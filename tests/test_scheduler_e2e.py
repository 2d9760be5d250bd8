"""Through the real training runner: customer_x's shipped manifest (shortened, on the tiny Llama)
queued, dispatched by the scheduler actor as a Ray task, trained with Ray Train, published once; the
shipped DPO manifest (jobs/customer_x_dpo.yaml, for another tenant) queued beside it trains in the
same pack and publishes its reward metrics."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from farm import scheduler
from farm.manifest import Manifest, load_manifest
from farm.queue import JobState, SQLiteStore
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def test_customer_x_job_trains_and_publishes_through_the_queue(ray_cluster, farm_home, tiny_llama):
    import ray

    base = load_manifest(REPO / "jobs" / "customer_x.yaml").model_dump(mode="json")
    base["base_model"] = str(tiny_llama)
    base["training"].update(max_steps=4, eval_every=2, checkpoint_every=2, batch_size=4)
    manifest = Manifest.model_validate(base)
    store = SQLiteStore(farm_home / "queue.db")
    job_id = store.submit(manifest).job_id
    prefs = load_manifest(REPO / "jobs" / "customer_x_dpo.yaml").model_dump(mode="json")
    prefs.update(base_model=str(tiny_llama), customer="globex")
    prefs["training"].update(max_steps=4, eval_every=2, checkpoint_every=2, batch_size=4)
    dpo_id = store.submit(Manifest.model_validate(prefs)).job_id
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    actor = scheduler.start(scheduler.SchedulerConfig(name=name, namespace="farm-tests", poll_s=0.1))
    try:
        wait_for(lambda: store.get(job_id).done and store.get(dpo_id).done, timeout=240, what="the jobs to end",
                 every=0.5)
        job = store.get(job_id)
        log = (farm_home / "logs" / "jobs" / f"{job_id}.log").read_text()
        assert job.state is JobState.SUCCEEDED, f"{job.state}: {job.last_error}\n{log[-3000:]}"
    finally:
        ray.kill(actor, no_restart=True)
    assert job.adapter_ref == "customer_x/support-bot@v1"
    assert job.progress["step"] == job.progress["total_steps"] == 4
    assert job.tokens > 0 and job.accelerator_seconds > 0
    assert "step 4/4" in log
    from farm.catalog import Catalog

    version = Catalog().resolve("customer_x/support-bot")
    assert version.ref == job.adapter_ref
    assert version.metadata["job_id"] == job_id
    dpo = store.get(dpo_id)
    assert dpo.state is JobState.SUCCEEDED, dpo.last_error
    assert dpo.pack and job.pack is None  # the DPO job on the pack engine; customer_x's job alone
    assert dpo.adapter_ref == "globex/support-bot-dpo@v1" and dpo.progress["step"] == 4
    prefs_version = Catalog().resolve("globex/support-bot-dpo")
    assert prefs_version.metadata["manifest"]["method"] == "dpo"
    metrics = prefs_version.metadata["metrics"]
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and "train_reward_margin" in metrics, metrics
