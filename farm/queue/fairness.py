"""The dispatch policy, as pure functions over plain values (no database, no Ray).

Higher priority first. Among equal priorities the next job comes from the customer with the fewest
running jobs, then the one served least recently (never served first), then FIFO within a customer.
So a customer with 50 queued jobs takes turns with one that has 1; it cannot starve it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NEVER = float("-inf")


@dataclass(frozen=True)
class Candidate:
    """An eligible job, reduced to what ordering needs."""

    job_id: str
    customer: str
    priority: int
    seq: int  # submission order


def _key(c: Candidate, running: Mapping[str, int], last_served: Mapping[str, float]) -> tuple:
    return (-c.priority, running.get(c.customer, 0), last_served.get(c.customer, NEVER), c.seq)


def pick_next(
    candidates: Iterable[Candidate],
    running: Mapping[str, int],
    last_served: Mapping[str, float],
    per_customer_limit: int | None = None,
) -> Candidate | None:
    """The job to dispatch now, or None. `running`: running jobs per customer; `last_served`: when
    each customer last had a job dispatched; customers at `per_customer_limit` are skipped."""
    best, best_key = None, None
    for c in candidates:
        if per_customer_limit is not None and running.get(c.customer, 0) >= per_customer_limit:
            continue
        k = _key(c, running, last_served)
        if best_key is None or k < best_key:
            best, best_key = c, k
    return best


def fair_order(
    candidates: Iterable[Candidate],
    running: Mapping[str, int] | None = None,
    last_served: Mapping[str, float] | None = None,
) -> list[Candidate]:
    """The order in which `candidates` would be dispatched one at a time (each finishing before the
    next starts): repeated `pick_next`, in O(n log customers) instead of O(n^2)."""
    running = dict(running or {})
    served = dict(last_served or {})
    tick = max([v for v in served.values() if v != NEVER], default=0.0)
    levels: dict[int, dict[str, deque[Candidate]]] = defaultdict(lambda: defaultdict(deque))
    for c in sorted(candidates, key=lambda c: c.seq):
        levels[c.priority][c.customer].append(c)
    out: list[Candidate] = []
    for prio in sorted(levels, reverse=True):
        queues = levels[prio]
        heap = [(running.get(cu, 0), served.get(cu, NEVER), q[0].seq, cu) for cu, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            run, _, _, cu = heapq.heappop(heap)
            q = queues[cu]
            out.append(q.popleft())
            tick += 1.0
            served[cu] = tick
            if q:
                heapq.heappush(heap, (run, tick, q[0].seq, cu))
    return out
