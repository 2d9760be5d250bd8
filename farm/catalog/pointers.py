"""Moving the per-adapter `latest.json` pointer with compare-and-swap.

Publishers only move it forward (a slower publisher of v2 never hides v3); deletes move it back to
the newest remaining version. The pointer embeds that version's farm.json, so resolve costs one GET.
"""

from __future__ import annotations

from farm.catalog import layout
from farm.catalog.metadata import AdapterVersion
from farm.catalog.resolve import newest_complete, read_pointer
from farm.catalog.store import Store
from farm.errors import CatalogError

MAX_CAS_TRIES = 50


def _payload(v: AdapterVersion | None, raw: bytes | None) -> bytes:
    if v is None:
        return layout.dumps({"version": 0, "farm_json": None})
    return layout.dumps({"version": v.version, "farm_json": raw.decode()})


def advance_latest(store: Store, v: AdapterVersion, raw: bytes) -> None:
    """Point latest at v unless it already points at v or newer."""
    key = layout.latest_key(v.customer, v.adapter)
    for _ in range(MAX_CAS_TRIES):
        got = read_pointer(store, key)
        if got is not None and int(got[0]["version"]) >= v.version:
            return
        if store.swap(key, _payload(v, raw), got[1] if got else None):
            return
    raise CatalogError(f"could not move {store.uri(key)} after {MAX_CAS_TRIES} tries (heavy contention)")


def retreat_latest(store: Store, customer: str, adapter: str, gone: int) -> None:
    """If latest points at version `gone` (being deleted), point it at the newest version below."""
    key = layout.latest_key(customer, adapter)
    for _ in range(MAX_CAS_TRIES):
        got = read_pointer(store, key)
        if got is None or int(got[0]["version"]) != gone:
            return
        below = newest_complete(store, customer, adapter, below=gone)
        raw = store.read(f"{layout.version_key(customer, adapter, below.version)}/{layout.FARM_JSON}") if below else None
        if store.swap(key, _payload(below, raw), got[1]):
            return
    raise CatalogError(f"could not move {store.uri(key)} after {MAX_CAS_TRIES} tries (heavy contention)")


def repair_latest(store: Store, customer: str, adapter: str) -> bool:
    """gc: make latest point at the newest complete version (after crashes). True if it changed."""
    key = layout.latest_key(customer, adapter)
    for _ in range(MAX_CAS_TRIES):
        got = read_pointer(store, key)
        newest = newest_complete(store, customer, adapter)
        if got is None and newest is None:
            return False
        raw = store.read(f"{layout.version_key(customer, adapter, newest.version)}/{layout.FARM_JSON}") if newest else None
        if got is not None and (got[0].get("farm_json") or "").encode() == (raw or b""):
            return False  # already right (both empty when no version is left)
        if store.swap(key, _payload(newest, raw), got[1] if got else None):
            return True
    raise CatalogError(f"could not move {store.uri(key)} after {MAX_CAS_TRIES} tries (heavy contention)")
