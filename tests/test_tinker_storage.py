"""Tinker checkpoints in run storage: the per-tenant storage quota, ttl_seconds and the hourly ledger,
on the pack worker class in process (no Ray, no HTTP) on the tiny NF4 Llama, as the routes drive it."""

from __future__ import annotations

import asyncio
import time

import pytest

from farm.tinker.errors import TinkerApiError
from farm.tinker.types import CreateModel, LoraConfig, SaveWeights
from tests.test_tinker_evict import _step


async def _save(worker, model_id: str, seq: int, name: str, **kw) -> dict:
    answer = await worker.submit("acme", "save_weights", SaveWeights(model_id=model_id, path=name, seq_id=seq, **kw))
    return (await worker.retrieve("acme", answer["request_id"], wait_s=60))["result"]


async def _scenario(tiny, storage) -> None:
    from farm.tinker.state import StateStore
    from farm.tinker.worker import TinkerWorker

    worker = TinkerWorker({"base_model": str(tiny), "served_name": "tiny-llama", "window_ms": 0,
                           "storage": str(storage), "max_stored_bytes": None})
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
    assert refused["category"] == "user" and f"storage quota: tenant 'acme' keeps {kept} bytes in 1 checkpoints" \
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
    worker.loop_task.cancel()


def test_storage_quota_ttl_and_ledger(tiny_llama, tmp_path):
    asyncio.run(_scenario(tiny_llama, tmp_path / "storage"))
