"""The model deployment: N replicas, each one engine (the base once) and an LRU of at most K adapters.

The engine is a ServingEngine (farm/serve/engines/): the `farm` engine or vLLM, by cfg.engine; this
module does not know which.

The LRU is Ray Serve's model multiplexing keyed by the immutable version id, so Serve's router knows
which replica holds which adapter and, with routing=affinity, sends requests there. Loading an
adapter = verified fetch from the catalog into a temp folder + attach; eviction detaches it once no
queued or running request uses it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ray import serve

from farm.errors import CatalogError
from farm.serve import metrics
from farm.serve.config import ServeConfig
from farm.serve.engines.base import GenJob, Slot, create
from farm.serve.limits import ApiError
from farm.serve.resolver import catalog_error
from farm.serve.sampling import Sampler

MAX_VERSIONS = 4096  # version records kept for the loader before the ones no longer needed are forgotten


class Resident:
    """What the multiplexing LRU holds per adapter version; Serve calls __del__ when it evicts it."""

    def __init__(self, server: AdapterServer, vid: str, name: str, slot: Slot):
        self.server, self.vid, self.name, self.slot = server, vid, name, slot
        self._released = False

    def __del__(self):
        if self._released:
            return
        self._released = True
        self.server._resident.pop(self.vid, None)
        self.server.engine.detach(self.slot.name)
        metrics.get("cache_evictions").inc(tags={"adapter": self.name})


class AdapterServer:
    """Ray Serve deployment class (wrapped with serve.deployment in app.build_app)."""

    def __init__(self, config: dict):
        cfg = ServeConfig(**config)
        self.cfg = cfg
        self.engine = create(cfg)
        self._catalog = None
        self._versions: dict[str, object] = {}  # vid -> AdapterVersion, for the loader
        self._wanted: collections.Counter[str] = collections.Counter()  # vid -> requests awaiting get_adapter
        self._resident: dict[str, Resident] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="farm-adapters-"))
        self.load_seconds: list[float] = []
        self._warm_catalog()

        async def load(vid: str) -> Resident:
            return await self._load(vid)

        # Wired per instance so K comes from the config (Serve detects instance-level multiplexing).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters)(load)

    def _warm_catalog(self) -> None:
        """Open and connect the catalog now and make its first request in the background, so that the
        first adapter load does not pay the client's set-up (S3: ~1.4 s of imports, ~0.1 s of session,
        ~50-75 ms of first-request set-up on the 2-core box). Any failure shows up on the first load."""
        try:
            self.catalog.connect()
        except CatalogError:
            return

        def ping():
            try:
                self.catalog.ping()
            except Exception:  # noqa: BLE001 - only a warm-up: an unreachable catalog fails the loads themselves
                pass

        threading.Thread(target=ping, name="farm-catalog-ping", daemon=True).start()  # never delays start

    @property
    def catalog(self):
        if self._catalog is None:
            from farm.catalog import Catalog

            self._catalog = Catalog(self.cfg.catalog_url)
        return self._catalog

    async def _load(self, vid: str) -> Resident:
        version = self._versions[vid]
        name = f"{version.customer}/{version.adapter}"
        dest = self._dir / re.sub(r"[^A-Za-z0-9_.-]", "_", vid)
        t0 = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.catalog.fetch, version, dest)
            labels = _labels(version.metadata or {})
            slot = await asyncio.to_thread(self.engine.attach, Path(path), labels, name=vid)
        except CatalogError as exc:
            raise catalog_error(exc, version.ref) from None
        finally:
            shutil.rmtree(dest, ignore_errors=True)  # weights are in memory (or the engine's own copy) now
        took = time.perf_counter() - t0
        self.load_seconds.append(took)
        metrics.get("load").observe(took, tags={"adapter": name})
        resident = Resident(self, vid, name, slot)
        self._resident[vid] = resident
        return resident

    async def _slot(self, job: dict, task: str) -> Slot | None:
        version = job.get("version")
        if version is None:
            if task == "seq_cls":
                raise ApiError(400, f"{job['ref']} is the base model; /v1/classify needs a seq_cls adapter")
            return None
        vid = version.id
        hit = vid in self._resident
        metrics.get("cache_hits" if hit else "cache_misses").inc(tags={"adapter": job["name"]})
        if len(self._versions) > MAX_VERSIONS:
            self._forget_versions()
        self._versions[vid] = version
        self._wanted[vid] += 1
        try:
            resident = await self.get_adapter(vid)
        finally:
            self._wanted[vid] -= 1
            if self._wanted[vid] <= 0:
                del self._wanted[vid]
        if resident.slot.task != task:
            route = "/v1/classify" if resident.slot.task == "seq_cls" else "/v1/completions or /v1/chat/completions"
            raise ApiError(400, f"{job['ref']} is a {resident.slot.task} adapter; use {route}")
        return resident.slot

    def _forget_versions(self) -> None:
        """Drop the versions the loader can no longer need. Not only the resident ones: a request
        that stored its version and then waits in get_adapter (Serve loads one adapter at a time, so
        a load can wait seconds) still needs it; dropping it there made that load fail with a
        KeyError (a 500) when other requests pruned meanwhile. Kept: resident or still awaited."""
        keep = set(self._resident) | set(self._wanted)
        self._versions = {v: ver for v, ver in self._versions.items() if v in keep}

    async def generate(self, job: dict):
        """Stream engine events for one request (`job` is built by the ingress)."""
        slot = await self._slot(job, "causal_lm")
        gen = GenJob(
            prompt_ids=job["prompt_ids"],
            max_tokens=job["max_tokens"],
            sampler=Sampler(temperature=job["temperature"], top_p=job["top_p"], seed=job["seed"],
                            top_k=job.get("top_k", 0)),
            stops=job["stops"],
            stop_token_ids=job.get("stop_token_ids", []),
            keep_stop_token=job.get("keep_stop_token", False),
            ignore_eos=job.get("ignore_eos", False),
            slot=slot.name if slot else None,
            tag=job["name"],
            stream=job["stream"],
            tenant=job.get("tenant") or job["name"].split("/")[0],
            logprobs=job.get("logprobs"),
            prompt_logprobs=job.get("prompt_logprobs"),
        )
        async for event in self.engine.generate(gen):
            if "error" in event:
                raise event["error"]
            yield event

    async def complete(self, job: dict) -> dict:
        """The whole result of one non-streaming request."""
        async for event in self.generate(job):
            if "done" in event:
                return event["done"]
        raise ApiError(500, "generation ended without a result", "server_error")

    async def classify(self, job: dict) -> dict:
        slot = await self._slot(job, "seq_cls")
        return await asyncio.to_thread(self.engine.classify, slot.name, job["prompt_ids"])

    async def cache_state(self) -> dict:
        """This replica's resident adapters and counters (admin endpoint, tests)."""
        return {
            "pid": os.getpid(),  # which replica process answered (ops, the replica-kill test)
            "resident": sorted(self._versions[vid].ref for vid in self._resident),
            "engine": getattr(self.engine, "kind", "farm"),
            "stats": dict(self.engine.stats),
            "load_seconds": list(self.load_seconds),
        }

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()


def _labels(metadata: dict) -> list[str] | None:
    """Class names recorded at publish time, if any (label_names / labels / id2label)."""
    for key in ("label_names", "labels"):
        v = metadata.get(key)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    id2label = metadata.get("id2label")
    if isinstance(id2label, dict):
        try:
            return [id2label[k] for k in sorted(id2label, key=int)]
        except (ValueError, KeyError):
            return None
    return None
