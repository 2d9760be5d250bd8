"""Futures an ingress replica answers (a sample): one whose replica died fails after sample_timeout_s
instead of leaving the SDK polling forever; one answered in time is the answer. The worker class in
process, no model loaded (nor loaded by the checkpoint-expiry sweep)."""

from __future__ import annotations

import asyncio
import time


async def _scenario(storage) -> None:
    from farm.tinker.worker import Op, TinkerWorker

    worker = TinkerWorker({"base_model": "unused", "served_name": "tiny", "sample_timeout_s": 0.5, "poll_s": 5,
                           "storage": str(storage)})
    # the expired-checkpoint sweep alone does not load the base (a worker no model was ever created on)
    assert worker._cycle([Op("expire", "", "", None)], []) == {} and worker.executor is None
    answered = await worker.open_future("acme", "sample")
    await worker.close_future(answered, {"sequences": [{"tokens": [1, 2], "logprobs": [-0.1, -0.2],
                                                        "stop_reason": "length"}]}, prompt_tokens=3)
    assert (await worker.retrieve("acme", answered, wait_s=5))["result"]["sequences"][0]["tokens"] == [1, 2]
    assert worker.usage["acme"]["sample_tokens"] == 2 and worker.usage["acme"]["prefill_tokens"] == 3

    lost = await worker.open_future("acme", "sample")  # its replica never closes it
    assert await worker.retrieve("acme", lost, wait_s=0.1) == {"try_again": "active"}  # still within the deadline
    t0 = time.monotonic()
    failed = await worker.retrieve("acme", lost, wait_s=5)  # the SDK's long poll ends at the deadline
    assert time.monotonic() - t0 < 2
    assert failed["result"]["category"] == "server" and "the serve replica running it was lost" in failed["result"]["error"]
    assert (await worker.retrieve("globex", lost, wait_s=0))["_error"][0] == 404  # another tenant's: not there
    # a late answer from a replica that was only slow changes nothing
    await worker.close_future(lost, {"sequences": []})
    assert "was lost" in (await worker.retrieve("acme", lost, wait_s=0))["result"]["error"]


def test_a_sample_whose_replica_died_fails_after_the_timeout(tmp_path):
    asyncio.run(_scenario(tmp_path))
