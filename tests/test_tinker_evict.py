"""Idle models leave the pack worker's memory and come back unchanged: the worker class in process (no
Ray, no HTTP) on the tiny NF4 Llama, driven as the routes drive it. A model evicted after two steps
takes its third with the loss and gradient norm of a twin that was never evicted; a model whose
gradients wait for their optim_step stays resident; a finished session's evicted model is gone; the
steps are in the tenant's cost ledger."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from farm.tinker.types import AdamParams, CreateModel, LoraConfig, OptimStep
from farm.tinker.wire import Datum, ForwardBackward

TOKENS = [5, 17, 33, 40, 12, 9, 60, 3, 21, 8]


def _fb(model_id: str, seq: int) -> ForwardBackward:
    t = np.array(TOKENS, np.int64)
    w = np.linspace(0.5, 1.5, len(t) - 1).astype(np.float32)
    return ForwardBackward(model_id, seq, "cross_entropy", False, [Datum(t[:-1], {"target_tokens": t[1:], "weights": w})])


async def _result(worker, tenant: str, answer: dict) -> dict:
    assert "_error" not in answer, answer
    got = await worker.retrieve(tenant, answer["request_id"], wait_s=60)
    assert "result" in got and "error" not in got["result"], got
    return got["result"]


async def _step(worker, model_id: str, seq: int) -> tuple[float, float]:
    """forward_backward then optim_step; (loss, grad norm). Uses seq and seq + 1."""
    fb = await _result(worker, "acme", await worker.submit("acme", "forward_backward", _fb(model_id, seq)))
    op = await _result(worker, "acme", await worker.submit(
        "acme", "optim_step", OptimStep(model_id=model_id, seq_id=seq + 1, adam_params=AdamParams(learning_rate=5e-3))))
    return fb["metrics"]["loss:sum"], op["metrics"]["grad_norm:mean"]


async def _wait(worker, key: str, value: int, timeout: float = 60) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while (state := await worker.state())[key] != value:
        assert asyncio.get_running_loop().time() < deadline, f"worker state {state}: {key} never became {value}"
        await asyncio.sleep(0.05)
    return state


async def _scenario(tiny, storage) -> None:
    from farm.tinker.worker import TinkerWorker

    worker = TinkerWorker({"base_model": str(tiny), "served_name": "tiny-llama", "window_ms": 0,
                           "idle_evict_s": 0.5, "storage": str(storage)})
    sid = (await worker.create_session("acme"))["session_id"]
    ids = []
    for n in range(3):
        create = CreateModel(session_id=sid, model_seq_id=n, base_model="tiny-llama",
                             lora_config=LoraConfig(rank=4, seed=7))
        ids.append((await worker.submit("acme", "create_model", create))["model_id"])
    for model_id in ids:
        await _result(worker, "acme", {"request_id": (await worker.submit("acme", "forward_backward",
                                                                          _fb(model_id, 1)))["request_id"]})
    evicted, twin, holding = ids
    # `holding` keeps the gradients of its forward_backward; the other two take their optim_step
    for model_id in (evicted, twin):
        await _result(worker, "acme", await worker.submit(
            "acme", "optim_step", OptimStep(model_id=model_id, seq_id=2, adam_params=AdamParams(learning_rate=5e-3))))
    twin_steps = [await _step(worker, twin, seq) for seq in (3, 5)]  # back to back, while `evicted` idles

    state = await _wait(worker, "evicted", 2)  # `evicted` and, once idle too, `twin`; never `holding`
    assert state["resident"] == 1 and holding in worker.executor.models and worker.executor.models[holding].pending
    assert evicted not in worker.executor.models and os.path.isdir(worker.evicted[evicted])
    # the evicted model's next steps: restored first, then the numbers of the twin that never left
    assert [await _step(worker, evicted, seq) for seq in (3, 5)] == twin_steps
    assert worker.executor.info(evicted)["steps"] == 3 and worker.executor.info(evicted)["tokens"] == 3 * (len(TOKENS) - 1)
    # the held gradients survived the sweeps: holding's optim_step applies them
    await _result(worker, "acme", await worker.submit(
        "acme", "optim_step", OptimStep(model_id=holding, seq_id=2, adam_params=AdamParams(learning_rate=5e-3))))

    # a finished session: its models leave, the evicted ones' folders too
    state = await _wait(worker, "evicted", 3)
    folders = list(worker.evicted.values())
    assert (await worker.finish_session("acme", sid))["released_models"] == 3
    await _wait(worker, "evicted", 0)
    assert state["evictions"] >= 3 and not any(os.path.exists(f) for f in folders)
    # the cost ledger: 7 forward/backward calls of 9 tokens; time for each step (the forward/backward
    # shares and the optimizer steps), on one accelerator
    usage = (await worker.state())["usage"]["acme"]
    assert usage["tokens"] == 7 * (len(TOKENS) - 1) and usage["accelerator_seconds"] > 0
    assert usage["sample_tokens"] == usage["prefill_tokens"] == 0
    worker.loop_task.cancel()


def test_an_idle_model_is_evicted_and_comes_back_with_the_numbers_of_a_twin_that_stayed(tiny_llama, tmp_path):
    asyncio.run(_scenario(tiny_llama, tmp_path / "storage"))
