"""The replica's version records (AdapterServer._versions) under concurrent loads: pruning them never
drops the version of a request still waiting for its adapter to load. A unit test: the catalog and
the engine are fakes, the loads are serialized like Serve's multiplexing (one at a time)."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from types import SimpleNamespace

import farm.serve.server as server_mod
from farm.serve.engine import Slot
from farm.serve.server import AdapterServer


class _Catalog:
    def fetch(self, version, dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return dest


class _Engine:
    def attach(self, path, labels=None, *, name=None):
        return Slot(name=name, task="causal_lm", num_labels=None)

    def detach(self, name):
        pass


def _server(tmp_path) -> AdapterServer:
    s = AdapterServer.__new__(AdapterServer)  # no engine, no Ray: just the loader's bookkeeping
    s._versions, s._wanted, s._resident = {}, collections.Counter(), {}
    s._catalog, s.engine, s._dir, s.load_seconds = _Catalog(), _Engine(), tmp_path, []
    lock = asyncio.Lock()
    loaded: dict[str, object] = {}

    async def get_adapter(vid):  # like serve.multiplexed: one load at a time, then cached
        async with lock:
            if vid not in loaded:
                await asyncio.sleep(0.01)  # a fetch in progress: others queue behind it
                loaded[vid] = await s._load(vid)
            return loaded[vid]

    s.get_adapter = get_adapter
    return s


def _job(vid: str) -> dict:
    version = SimpleNamespace(id=vid, customer="acme", adapter=vid, ref=f"acme/{vid}@v1", metadata={})
    return {"version": version, "name": f"acme/{vid}", "ref": version.ref}


def test_pruning_versions_keeps_those_of_requests_still_waiting_for_their_load(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_VERSIONS", 2)
    s = _server(tmp_path)

    async def main():
        # 8 distinct adapters at once: loads queue one behind the other while later requests prune
        return await asyncio.gather(*(s._slot(_job(f"v{i}"), "causal_lm") for i in range(8)),
                                    return_exceptions=True)

    slots = asyncio.run(main())
    failures = [x for x in slots if isinstance(x, BaseException)]
    assert not failures, failures
    assert [x.name for x in slots] == [f"v{i}" for i in range(8)]
    assert not s._wanted  # nothing left marked as awaited


def test_pruning_still_forgets_versions_no_request_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_VERSIONS", 2)
    s = _server(tmp_path)
    s._versions = {f"old{i}": object() for i in range(5)}
    asyncio.run(s._slot(_job("new"), "causal_lm"))
    assert set(s._versions) == {"new"}
