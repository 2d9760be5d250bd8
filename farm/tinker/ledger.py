"""Where the pack worker's usage lasts: the `usage` table of the farm's queue database (farm.queue.usage).

The worker keeps the hours it has not written yet and adds them every `usage_flush_s`; `farm status`
and the billing endpoint (GET billing/usage/events) read the table, plus what is still pending. The
queue database is a SQLite file on the head node's disk (docs/operations.md), and the worker may run
on a GPU node: inside Ray each write or read is a small task placed on the head (`farm_head` when
the cluster has it); outside Ray (the worker class driven in process) it opens the file directly.
"""

from __future__ import annotations

import asyncio
from contextlib import closing

from farm.queue import SQLiteStore
from farm.queue.usage import UsageRow


def _add(queue_db: str, rows: list[UsageRow]) -> None:
    with closing(SQLiteStore(queue_db)) as store:
        store.add_usage(rows)


def _read(queue_db: str, customer: str, start: float, end: float) -> list[UsageRow]:
    with closing(SQLiteStore(queue_db)) as store:
        return store.usage(customer=customer, start=start, end=end, source="tinker")


class Ledger:
    """The queue database's usage table, reached from wherever the worker runs."""

    def __init__(self, queue_db: str):
        self.queue_db = queue_db
        self._tasks: dict = {}  # function name -> its Ray remote function (made once)

    async def add(self, rows: list[UsageRow]) -> None:
        await self._call(_add, self.queue_db, rows)

    async def rows(self, customer: str, start: float, end: float) -> list[UsageRow]:
        return await self._call(_read, self.queue_db, customer, start, end)

    async def _call(self, fn, *args):
        import ray

        if not ray.is_initialized():
            return await asyncio.to_thread(fn, *args)
        if fn.__name__ not in self._tasks:
            from farm.placement import head_resources

            self._tasks[fn.__name__] = ray.remote(fn).options(num_cpus=0, resources=head_resources(), max_retries=0)
        return await self._tasks[fn.__name__].remote(*args)
