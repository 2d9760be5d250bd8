"""The LoRA admission gate: never more distinct adapters in flight than the engine has LoRA slots.

vLLM batches requests of at most `max_loras` adapters per step, and with more distinct adapters in
flight than that, a batch mixing base rows and adapters has been seen to answer a base row with
another adapter's text (docs/serving.md). The gate makes that state unreachable: a request for an
adapter that is not already in flight waits until fewer than `slots` adapters are. Base-model
requests take no slot. With `max_active`, at most that many requests are in vLLM at once (its
batch, max_num_seqs): the rest wait here rather than in vLLM's first-come-first-served queue.
Waiting requests are served round-robin across tenants (farm/serve/fair.py), first come first
served within a tenant, and strictly in that order: once a request waits, every later one queues
behind its turn (even for an adapter in flight), so neither a hot adapter nor a flooding tenant
starves the others. A request leaves the gate when the engine has finished or aborted it.

Standard library only (fair.py is too): the vLLM worker process imports it from its own environment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from farm.serve.fair import FairQueue


class GateFull(Exception):
    """More requests than the gate may hold (in flight + waiting)."""

    def __init__(self, held: int):
        super().__init__(f"{held} requests already in flight or waiting on this replica")
        self.held = held


class AdapterGate:
    """asyncio-only (one event loop); `hold(key)` is the whole API. key None = the base model."""

    def __init__(self, slots: int, max_held: int, max_active: int | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.max_held = max_held
        self.max_active = max_active  # requests in flight at most (None: only the slots bound them)
        self.active: collections.Counter = collections.Counter()  # adapter key -> requests in flight
        self.base_active = 0
        self.waiting: FairQueue = FairQueue()  # per tenant: (key, future)
        self.peak_adapters = 0  # most distinct adapters ever in flight at once (tests, stats)
        self.waited = 0  # requests that had to wait for a slot

    @property
    def held(self) -> int:
        return sum(self.active.values()) + self.base_active + len(self.waiting)

    def _fits(self, key) -> bool:
        if self.max_active is not None and sum(self.active.values()) + self.base_active >= self.max_active:
            return False
        return key is None or key in self.active or len(self.active) < self.slots

    def _admit(self, key) -> None:
        if key is None:
            self.base_active += 1
        else:
            self.active[key] += 1
            self.peak_adapters = max(self.peak_adapters, len(self.active))

    def _pump(self) -> None:
        while self.waiting:
            key, fut = self.waiting.head()
            if fut.done():  # cancelled while waiting
                self.waiting.take(1)
                continue
            if not self._fits(key):
                return
            self.waiting.take(1)
            self._admit(key)
            fut.set_result(None)

    def _release(self, key) -> None:
        if key is None:
            self.base_active -= 1
        else:
            self.active[key] -= 1
            if self.active[key] <= 0:
                del self.active[key]
        self._pump()

    @contextlib.asynccontextmanager
    async def hold(self, key, tenant: str = ""):
        if self.held >= self.max_held:
            raise GateFull(self.held)
        if not self.waiting and self._fits(key):
            self._admit(key)
        else:
            self.waited += 1
            fut = asyncio.get_running_loop().create_future()
            self.waiting.append(tenant, (key, fut))
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release(key)  # admitted just as we were cancelled
                else:
                    fut.cancel()
                    self._pump()
                raise
        try:
            yield
        finally:
            self._release(key)

    def snapshot(self) -> dict:
        return {"slots": self.slots, "adapters_in_flight": len(self.active), "base_in_flight": self.base_active,
                "waiting_for_slot": len(self.waiting), "peak_adapters_in_flight": self.peak_adapters,
                "waited_for_slot": self.waited}
