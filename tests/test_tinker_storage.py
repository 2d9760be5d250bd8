"""Tinker checkpoints in run storage: the per-tenant storage quota, ttl_seconds and the hourly ledger,
on the pack worker class in process (no Ray, no HTTP) on the tiny NF4 Llama, as the routes drive it."""

from __future__ import annotations

import asyncio
import time

import pytest

from farm.tinker.errors import TinkerApiError
from farm.tinker.types import AdamParams, CreateModel, LoraConfig, OptimStep, SaveWeights, SaveWeightsForSampler
from tests.test_tinker_evict import _step


async def _save(worker, model_id: str, seq: int, name: str, **kw) -> dict:
    answer = await worker.submit("acme", "save_weights", SaveWeights(model_id=model_id, path=name, seq_id=seq, **kw))
    return (await worker.retrieve("acme", answer["request_id"], wait_s=60))["result"]


async def _scenario(tiny, storage) -> None:
    from farm.tinker.state import StateStore
    from farm.tinker.worker import TinkerWorker

    worker = TinkerWorker({"base_model": str(tiny), "served_name": "tiny-llama", "window_ms": 0,
                           "storage": str(storage), "catalog_url": str(storage.parent / "catalog"),
                           "queue_db": str(storage.parent / "queue.db"), "max_stored_bytes": None})
    sid = (await worker.create_session("acme"))["session_id"]
    create = CreateModel(session_id=sid, model_seq_id=0, base_model="tiny-llama", lora_config=LoraConfig(rank=4, seed=1))
    model_id = (await worker.submit("acme", "create_model", create))["model_id"]
    await _step(worker, model_id, 1)
    store = StateStore(str(storage))
    assert "error" not in await _save(worker, model_id, 3, "probe")
    count, size = store.usage("acme")
    assert count == 1 and size > 0
    store.delete(store.folder("acme", model_id, "probe"))
    assert store.usage("acme") == (0, 0)

    worker.cfg.max_stored_bytes = int(size * 1.5)  # room for one checkpoint
    assert "error" not in await _save(worker, model_id, 4, "one", ttl_seconds=2)
    kept = store.usage("acme")[1]
    refused = await _save(worker, model_id, 5, "two")
    assert refused["category"] == "user" and f"storage quota: tenant 'acme' keeps {kept} bytes in 1 checkpoints and 0 sampler weights" \
        in refused["error"] and f"would pass its {int(size * 1.5)}-byte limit" in refused["error"]
    assert "error" not in await _save(worker, model_id, 6, "one", overwrite=True, ttl_seconds=2)  # a replacement fits
    [one] = store.checkpoints("acme", model_id)
    assert one.name == "one" and one.expires_at is not None and 1 < one.expires_at - one.created <= 2.5
    time.sleep(max(0.0, one.expires_at - time.time()) + 0.1)
    # expired: not loadable, not counted, deleted by the next listing; "two" fits now
    assert store.usage("acme") == (0, 0) and not store.fs.exists(one.folder)
    assert "error" not in await _save(worker, model_id, 7, "two")
    assert [c.name for c in store.checkpoints("acme")] == ["two"] and store.checkpoints("globex") == []
    for escape in ("..", ".", "a/../../globex"):  # a model id is one path segment of the tenant's folder
        with pytest.raises(TinkerApiError, match="not found"):
            store.folder("acme", escape, "two")
    # the ledger: 4 checkpoints made (probe, one twice, two; not the refused one), one step of 9 tokens
    rows = await worker.billing("acme", 0, time.time() + 3600)
    assert {r["kind"]: r["count"] for r in rows} == {"checkpoint": 4, "training": 9}
    assert await worker.billing("globex", 0, time.time() + 3600) == []
    # the ledger lasts in the queue database's usage table: a flush moves it there, the answer stays the same
    from farm.queue import SQLiteStore

    assert await worker.flush_usage() == 2 and worker.pending == {}
    assert await worker.billing("acme", 0, time.time() + 3600) == rows
    kept = {r.kind: r for r in SQLiteStore(worker.cfg.queue_db).usage(customer="acme")}
    assert kept["training"].amount == 9 and kept["training"].accelerator_seconds > 0 and kept["checkpoint"].amount == 4
    worker.loop_task.cancel()


def test_storage_quota_ttl_and_ledger(tiny_llama, tmp_path):
    asyncio.run(_scenario(tiny_llama, tmp_path / "storage"))


async def _publish(worker, model_id: str, seq: int, *, name: str | None = None, sampler_seq: int | None = None) -> dict:
    body = SaveWeightsForSampler(model_id=model_id, seq_id=seq, path=name, sampling_session_seq_id=sampler_seq)
    answer = await worker.submit("acme", "save_weights_for_sampler", body)
    return (await worker.retrieve("acme", answer["request_id"], wait_s=60))["result"]


async def _sampler_scenario(tiny, storage, catalog) -> None:
    from farm.catalog import Catalog
    from farm.tinker.samplers import SamplerCatalog, snapshot_adapter, stored
    from farm.tinker.state import StateStore
    from farm.tinker.worker import TinkerWorker

    worker = TinkerWorker({"base_model": str(tiny), "served_name": "tiny-llama", "window_ms": 0,
                           "storage": str(storage), "catalog_url": str(catalog), "max_stored_bytes": None,
                           "sampler_snapshots_kept": 2})
    sid = (await worker.create_session("acme"))["session_id"]
    create = CreateModel(session_id=sid, model_seq_id=0, base_model="tiny-llama", lora_config=LoraConfig(rank=4, seed=1))
    model_id = (await worker.submit("acme", "create_model", create))["model_id"]
    await _step(worker, model_id, 1)
    samplers, states = SamplerCatalog(str(catalog)), StateStore(str(storage))
    run = states.run("acme", model_id)  # the run's record, written at create
    assert (run.lora_rank, run.base_model, run.train_mlp, run.user_metadata) == (4, "tiny-llama", True, None)
    assert [r.model_id for r in states.runs("acme")] == [model_id] and states.run("globex", model_id) is None

    # named sampler weights are catalog versions that count towards the quota, beside save_state checkpoints
    named = await _publish(worker, model_id, 3, name="step-1")
    assert named["path"] == f"tinker://{model_id}/sampler_weights/step-1" and named["catalog_ref"] == "acme/step-1@v1"
    weights = Catalog(str(catalog)).resolve("acme/step-1@v1")
    assert stored(states, samplers, "acme").sampler_bytes == weights.size > 0
    assert "error" not in await _save(worker, model_id, 4, "state")
    now = stored(states, samplers, "acme")
    assert (now.checkpoints, now.samplers) == (1, 1) and now.size_bytes == now.checkpoint_bytes + weights.size
    assert samplers.latest("acme", model_id, "step-1").ref == "acme/step-1@v1"
    worker.cfg.max_stored_bytes = now.size_bytes + weights.size // 2  # no room for another named publish ...
    refused = await _publish(worker, model_id, 5, name="step-2")
    assert refused["category"] == "user" and (f"keeps {now.size_bytes} bytes in 1 checkpoints and 1 sampler weights"
                                              in refused["error"])
    assert Catalog(str(catalog)).versions("acme", "step-2") == []  # refused: nothing published

    # ... but ephemeral snapshots are not counted: the newest `sampler_snapshots_kept` (2) of the model stay
    snaps = [await _publish(worker, model_id, 6 + i, sampler_seq=i) for i in range(3)]
    assert all("error" not in s for s in snaps), snaps
    snapshot = snapshot_adapter(model_id)
    assert [v.version for v in Catalog(str(catalog)).versions("acme", snapshot)] == [2, 3]
    assert stored(states, samplers, "acme") == now
    oldest, newest = snaps[0]["sampling_session_id"], snaps[2]["sampling_session_id"]
    gone = await worker.sampler("acme", oldest)
    assert gone["_error"][0] == 410 and "the worker keeps the newest 2 snapshots" in gone["_error"][1]
    assert (await worker.sampler("acme", newest)) == {"model": f"acme/{snapshot}@v3"}

    # a named path names the newest version its model published; found in the catalog, not in memory
    made = await worker.create_sampler("acme", sid, 9, named["path"], None)
    assert "_error" not in made and (await worker.sampler("acme", made["sampling_session_id"]))["model"] == "acme/step-1@v1"
    missing = await worker.create_sampler("acme", sid, 10, f"tinker://{model_id}/sampler_weights/nope", None)
    assert missing["_error"][0] == 404

    # the session's end deletes its models' snapshots (named weights stay)
    await worker.finish_session("acme", sid)
    deadline = time.time() + 60
    while Catalog(str(catalog)).versions("acme", snapshot):
        assert time.time() < deadline, "the finished session's snapshots were never deleted"
        await asyncio.sleep(0.1)
    assert (await worker.sampler("acme", newest))["_error"][0] == 410
    assert [s.ref for s in samplers.published("acme")] == ["acme/step-1@v1"]
    worker.loop_task.cancel()


def test_sampler_weights_quota_and_snapshots(tiny_llama, tmp_path):
    asyncio.run(_sampler_scenario(tiny_llama, tmp_path / "storage", tmp_path / "catalog"))


async def _expiry_scenario(tiny, tmp) -> None:
    from farm.catalog import Catalog
    from farm.tinker.samplers import snapshot_adapter
    from farm.tinker.worker import TinkerWorker

    worker = TinkerWorker({"base_model": str(tiny), "served_name": "tiny-llama", "window_ms": 0, "idle_evict_s": None,
                           "storage": str(tmp / "storage"), "catalog_url": str(tmp / "catalog"),
                           "queue_db": str(tmp / "queue.db"), "session_timeout_s": 4.0, "usage_flush_s": 0.2})
    quiet, alive = [(await worker.create_session("acme"))["session_id"] for _ in range(2)]
    models = []
    for sid in (quiet, alive):
        create = CreateModel(session_id=sid, model_seq_id=0, base_model="tiny-llama", lora_config=LoraConfig(rank=4))
        models.append((await worker.submit("acme", "create_model", create))["model_id"])
    for m in models:
        await _step(worker, m, 1)
    assert "error" not in await _publish(worker, models[0], 3, sampler_seq=0)  # a snapshot of the quiet session
    assert Catalog(str(tmp / "catalog")).versions("acme", snapshot_adapter(models[0]))
    deadline = time.time() + 60
    while (await worker.state())["sessions"] != 1:  # the SDK's heartbeat keeps `alive`; `quiet` sends none
        assert time.time() < deadline, "the quiet session never expired"
        assert "_error" not in await worker.touch_session("acme", alive)
        await asyncio.sleep(0.2)
    assert (await worker.touch_session("acme", quiet))["_error"][0] == 404
    refused = await worker.submit("acme", "optim_step", OptimStep(model_id=models[0], seq_id=3,
                                                                  adam_params=AdamParams(learning_rate=1e-3)))
    assert refused["_error"][0] == 404  # its models are gone, as after close
    assert (await worker.state())["models"] == 1 and await _step(worker, models[1], 3)
    while Catalog(str(tmp / "catalog")).versions("acme", snapshot_adapter(models[0])):
        assert time.time() < deadline, "the expired session's snapshot was never deleted"
        await asyncio.sleep(0.1)
    # the loop flushed the usage on its own (usage_flush_s): three steps of 9 tokens, one snapshot
    from farm.queue import SQLiteStore

    while (await worker.state())["usage"]["acme"]["tokens"] != 27 or worker.pending or worker.flushing:
        assert time.time() < deadline, f"the usage was never flushed: {worker.pending}"
        await asyncio.sleep(0.1)
    kept = {r.kind: r.amount for r in SQLiteStore(tmp / "queue.db").usage(customer="acme")}
    assert kept == {"training": 27, "checkpoint": 1}
    worker.loop_task.cancel()


def test_a_session_without_heartbeats_expires_and_its_models_leave(tiny_llama, tmp_path):
    asyncio.run(_expiry_scenario(tiny_llama, tmp_path))
