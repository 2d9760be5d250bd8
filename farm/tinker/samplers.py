"""Sampler weights: the catalog versions `save_weights_for_sampler` publishes, found by their farm.json.

Every version the pack worker publishes carries `metadata["tinker"]` = {"model_id", "ephemeral", ...}, so
the catalog itself (not the worker's memory) says which versions are a Tinker model's sampler weights;
listing, deleting and the storage quota work the same after a worker restart.

* **Named** (`save_weights_for_sampler(name)`): `<tenant>/<name>@vN`. They persist: `list_checkpoints`
  lists them, `delete_checkpoint` deletes the versions of that name the model published, and their bytes
  count towards the tenant's storage quota with its save_state checkpoints (`stored`).
* **Ephemeral** (`save_weights_and_get_sampling_client()`, "always ephemeral" in the SDK):
  `<tenant>/tinker-<12 hex of the model id>@vN`. The worker keeps the newest `sampler_snapshots_kept` of
  a model and deletes the others, and all of them when the model's session ends; not in the quota.

A scan reads one listing per adapter of the tenant and one farm.json per version (no cache: a version
deleted with `farm adapters delete` must stop counting at once). No heavy imports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from farm.tinker.state import tinker_path

EPHEMERAL_PREFIX = "tinker-"


def snapshot_adapter(model_id: str) -> str:
    """The catalog adapter name of a model's ephemeral snapshots."""
    return f"{EPHEMERAL_PREFIX}{hashlib.sha256(model_id.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class SamplerWeights:
    """One published version of a Tinker model's weights."""

    tenant: str
    adapter: str
    version: int
    model_id: str
    size_bytes: int
    created: float
    ephemeral: bool

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.adapter}@v{self.version}"

    @property
    def path(self) -> str:
        return tinker_path(self.model_id, self.adapter, "sampler_weights")


class SamplerCatalog:
    """The Tinker-published versions in one catalog."""

    def __init__(self, url: str):
        from farm.catalog import Catalog

        self.catalog = Catalog(url)

    def published(self, tenant: str, *, model_id: str | None = None, adapter: str | None = None,
                  ephemeral: bool | None = None) -> list[SamplerWeights]:
        """The tenant's Tinker-published versions (of one model, of one adapter name, of one kind),
        oldest first."""
        from farm.catalog.resolve import read_version, version_numbers
        from farm.errors import CatalogError

        store = self.catalog.store
        found = []
        for name in [adapter] if adapter is not None else store.children(tenant):
            for n in version_numbers(store, tenant, name):
                try:
                    v = read_version(store, tenant, name, n)
                except CatalogError:
                    continue  # an unreadable farm.json: `farm adapters` reports it, it is not a sampler's
                info = (v.metadata.get("tinker") if v is not None and v.metadata.get("source") == "tinker" else None)
                if not isinstance(info, dict) or not info.get("model_id"):
                    continue
                kind = bool(info.get("ephemeral", name.startswith(EPHEMERAL_PREFIX)))  # older versions: by name
                if (model_id is not None and info["model_id"] != model_id) or (ephemeral is not None and kind != ephemeral):
                    continue
                found.append(SamplerWeights(tenant, name, n, str(info["model_id"]), v.size, _timestamp(v.created), kind))
        return sorted(found, key=lambda s: (s.created, s.adapter, s.version))

    def latest(self, tenant: str, model_id: str, adapter: str) -> SamplerWeights | None:
        """The newest version of `adapter` that this model published (what its sampler path names)."""
        found = self.published(tenant, model_id=model_id, adapter=adapter, ephemeral=False)
        return max(found, key=lambda s: s.version) if found else None

    def usage(self, tenant: str) -> tuple[int, int]:
        """(versions, bytes) of the tenant's named sampler weights: what counts towards its quota."""
        found = self.published(tenant, ephemeral=False)
        return len(found), sum(s.size_bytes for s in found)

    def delete(self, weights: SamplerWeights) -> None:
        """Delete one version; an alias on it (set with `farm adapters alias`) goes with it."""
        self.catalog.delete(weights.ref, force=True)

    def prune(self, tenant: str, model_id: str, keep: int) -> list[SamplerWeights]:
        """Delete the model's ephemeral snapshots but the newest `keep`; what was deleted."""
        from farm.errors import AdapterNotFound

        found = sorted(self.published(tenant, model_id=model_id, adapter=snapshot_adapter(model_id), ephemeral=True),
                       key=lambda s: s.version)
        gone = found[:max(0, len(found) - keep)]
        for s in gone:
            try:
                self.delete(s)
            except AdapterNotFound:
                pass  # deleted meanwhile (`farm adapters delete`)
        return gone


@dataclass(frozen=True)
class Stored:
    """What a tenant keeps that its storage quota counts: save_state checkpoints and named sampler weights."""

    checkpoints: int
    checkpoint_bytes: int
    samplers: int
    sampler_bytes: int

    @property
    def count(self) -> int:
        return self.checkpoints + self.samplers

    @property
    def size_bytes(self) -> int:
        return self.checkpoint_bytes + self.sampler_bytes

    def describe(self) -> str:
        return (f"{self.size_bytes} bytes in {self.checkpoints} checkpoints and {self.samplers} sampler weights")


def stored(states, samplers: SamplerCatalog, tenant: str) -> Stored:
    """The tenant's quota count now (`states`: its run storage's StateStore)."""
    return Stored(*states.usage(tenant), *samplers.usage(tenant))


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
