"""The vLLM engine's bounds, against the real vLLM CPU build (`make vllm-env`; skipped without it):
more adapters cycled through a replica than vLLM has places for never make vLLM evict on its own,
every answer stays its own adapter's, and the worker's port answers only its replica.

The engine is driven directly (no Serve): the test plays the replica's LRU of 2 (detach the oldest
before attaching the next) while each dropped adapter still has requests queued at the 1-slot gate,
which is what piles up registrations under real traffic.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from farm.serve.engines.base import vllm_python
from tests.serve_helpers import PROMPT
from tests.test_serve_support import make_adapter
from tests.test_serve_vllm import stock_fp32

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (make vllm-env)")

# LONG: the answers that hold the gate's slots while the other adapters queue (one on each of the first two
# adapters, as long as the context allows: 12 + 480 of 512). Dropped, those two keep their vLLM places until
# their long answers end, so the attaches after them must wait for room even when a loaded box attaches slowly
# (with one long answer, the second adapter's short requests could drain before the fifth attach: no wait)
K, SLOTS, ADAPTERS, PER_ADAPTER, TOKENS, LONG = 2, 1, 8, 4, 32, 480


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from farm.serve.engines.vllm import VllmEngine

    eng = VllmEngine(str(tiny_llama), python=vllm_python(), dtype="fp32", lora_slots=SLOTS, max_adapters=K,
                     max_lora_rank=8, max_batch_size=4, max_waiting=64, threads=1)
    yield eng
    eng.close()


def test_cycling_more_adapters_than_vllm_holds_never_overfills_it_and_answers_stay_right(engine, tiny_llama, tmp_path):
    from farm.modeling import load_tokenizer
    from farm.serve.engine import GenJob
    from farm.serve.engines.vllm_worker import _capacity
    from farm.serve.sampling import Sampler

    # what the worker sized vLLM for: LRU K + the gate's slots + 2 (one is the base's identity adapter)
    capacity = _capacity({"max_cpu_loras": max(K, SLOTS), "max_loras": SLOTS})
    ids = load_tokenizer(str(tiny_llama)).encode(PROMPT)
    dirs = [make_adapter(tiny_llama, tmp_path / f"a{i}", seed=3 + i) for i in range(ADAPTERS)]
    want = [stock_fp32(tiny_llama, d, ids, TOKENS) for d in dirs]
    want_long = [stock_fp32(tiny_llama, d, ids, LONG) for d in dirs[:2]]
    seen: list[tuple[set, set]] = []  # (registered by the replica, held by vLLM) at each sample
    stop = threading.Event()

    def watch():  # what vLLM itself holds, sampled all along
        while not stop.is_set():
            try:
                state = engine._http.get(f"{engine.url}/state", timeout=10).json()
                seen.append((set(state["loras"]), set(state["vllm_loras"])))
            except Exception:  # noqa: BLE001 - a sample lost is fine
                pass
            stop.wait(0.05)

    async def ask(slot: str, tokens: int = TOKENS) -> str:
        job = GenJob(prompt_ids=ids, max_tokens=tokens, sampler=Sampler(temperature=0.0, top_p=1.0, seed=None),
                     stops=[], slot=slot, tag=slot, stream=False)
        async for event in engine.generate(job):
            if "error" in event:
                raise event["error"]
            if "done" in event:
                return event["done"]["text"]
        raise AssertionError("no result")

    async def drive():
        live: list[str] = []
        tasks, longs = [], []
        for i, d in enumerate(dirs):
            if len(live) == K:  # the LRU drops its oldest while that adapter's requests still queue
                engine.detach(live.pop(0))
            slot = await asyncio.to_thread(engine.attach, d, None, name=f"ver-{i}")
            live.append(slot.name)
            if i < 2:  # long answers hold the gate's slots: the next adapters' requests queue
                longs.append(asyncio.ensure_future(ask(slot.name, LONG)))
                await asyncio.sleep(0.2)
            tasks += [(i, asyncio.ensure_future(ask(slot.name))) for _ in range(PER_ADAPTER)]
            await asyncio.sleep(0)  # let them reach the worker's gate
        return [(i, await t) for i, t in tasks], [await t for t in longs]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answers, long_answer = asyncio.run(drive())
    finally:
        stop.set()
        watcher.join()
    wrong = [(i, got, want[i]) for i, got in answers if got != want[i]]
    assert not wrong, wrong
    assert long_answer == want_long
    assert len(answers) == ADAPTERS * PER_ADAPTER
    assert seen
    most = max(len(registered) for registered, _ in seen)
    assert most <= capacity - 1, f"{most} adapters registered with vLLM sized for {capacity - 1} (+ identity)"
    evicted = [registered - held for registered, held in seen if registered - held]
    assert not evicted, f"vLLM evicted adapters the farm still had registered: {evicted[:3]}"
    stats = engine.stats
    assert stats["peak_registered"] <= stats["max_registered"] == capacity - 1
    assert stats["registration_waits"] > 0  # the pressure was real: attach had to wait for room


def test_the_vllm_workers_port_refuses_calls_without_the_replicas_token(engine):
    assert httpx.get(f"{engine.url}/state", timeout=10).status_code == 401
    r = httpx.post(f"{engine.url}/adapters", json={"name": "x", "id": 99, "path": "/tmp"},
                   headers={"Authorization": "Bearer guessed"}, timeout=10)
    assert r.status_code == 401 and "token" in r.json()["error"]["message"]
    assert engine._http.get(f"{engine.url}/state", timeout=10).status_code == 200
    assert engine.url.startswith("http://127.0.0.1:")
