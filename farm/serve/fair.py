"""The farm engine's waiting requests, fair per tenant: one FIFO per tenant, served round-robin.

With one FIFO, a tenant that sends 200 requests at once puts every later tenant's request behind
all of them (and fills `max_waiting`, so the others are refused). Here a batch takes one request
from each waiting tenant in turn, and the turn carries over from batch to batch: a tenant that
starts waiting is served within its first batch once the tenants ahead of it in the rotation have
had one request each (with a batch of B rows and T tenants waiting, each gets at least B // T rows of
every batch). When the queue is full, a tenant with fewer waiting requests than the heaviest one
takes the place of that tenant's newest request, which is refused (503, retry) as if it had
arrived when the queue was full. Standard library only; not thread-safe (the engine holds its lock).
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-tenant FIFOs in a rotation. `fair=False`: one FIFO for everybody (the bench's baseline)."""

    def __init__(self, fair: bool = True):
        self.fair = fair
        self._queues: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _key(self, tenant: str) -> str:
        return tenant if self.fair else ""

    def append(self, tenant: str, item: T) -> None:
        self._queues.setdefault(self._key(tenant), collections.deque()).append(item)
        self._n += 1

    def take(self, n: int) -> list[T]:
        """Up to n items, one per tenant in turn; a tenant served goes to the back of the rotation."""
        out: list[T] = []
        while len(out) < n and self._queues:
            tenant, q = next(iter(self._queues.items()))
            out.append(q.popleft())
            if q:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant]
        self._n -= len(out)
        return out

    def head(self) -> T | None:
        """The item `take(1)` would return, left in place."""
        return self._queues[next(iter(self._queues))][0] if self._queues else None

    def waiting(self, tenant: str) -> int:
        return len(self._queues.get(self._key(tenant), ()))

    def make_room_for(self, tenant: str) -> T | None:
        """When full: the newest item of the tenant with the most waiting, removed, if it has more
        waiting than `tenant` would with one more; None when `tenant` is the one over its share."""
        if not self.fair or not self._queues:
            return None
        heaviest = max(self._queues, key=lambda k: len(self._queues[k]))
        if len(self._queues[heaviest]) <= self.waiting(tenant) + 1:
            return None
        item = self._queues[heaviest].pop()
        if not self._queues[heaviest]:
            del self._queues[heaviest]
        self._n -= 1
        return item
