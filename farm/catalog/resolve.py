"""Reading versions: a pinned version, the latest via its pointer, an alias; all O(1) requests.

latest = GET latest.json (which embeds the newest farm.json) + HEAD v<N+1>/farm.json, the probe that
catches a pointer lagging behind a publisher that died between writing farm.json and moving it.
"""

from __future__ import annotations

import json

from farm.catalog import layout
from farm.catalog.metadata import AdapterVersion, parse_farm_json
from farm.catalog.refs import AdapterRef
from farm.catalog.store import Store
from farm.errors import AdapterNotFound, CatalogError

# How far past the pointer resolve walks when probes keep finding newer complete versions.
MAX_PROBES = 16


def read_version(store: Store, customer: str, adapter: str, version: int) -> AdapterVersion | None:
    """The complete version vN, or None if it does not exist, is incomplete or was deleted."""
    vkey = layout.version_key(customer, adapter, version)
    raw = store.read(f"{vkey}/{layout.FARM_JSON}")
    if raw is None:
        return None
    return parse_farm_json(raw, customer=customer, adapter=adapter, version=version, uri=store.uri(vkey))


def read_pointer(store: Store, key: str) -> tuple[dict, str] | None:
    """A JSON pointer object and its tag, or None if missing."""
    got = store.read_tagged(key)
    if got is None:
        return None
    try:
        obj = json.loads(got[0])
        int(obj["version"])
    except (ValueError, KeyError, TypeError):
        raise CatalogError(f"{store.uri(key)} is malformed; `farm adapters gc` rewrites pointers") from None
    return obj, got[1]


def version_numbers(store: Store, customer: str, adapter: str) -> list[int]:
    """Every claimed version number of an adapter (complete or not), ascending. One listing."""
    return layout.version_numbers(store.children(layout.adapter_key(customer, adapter)))


def newest_complete(store: Store, customer: str, adapter: str, below: int | None = None) -> AdapterVersion | None:
    """Slow path (listing): the newest complete, undeleted version, optionally below a number."""
    for n in reversed(version_numbers(store, customer, adapter)):
        if below is not None and n >= below:
            continue
        v = read_version(store, customer, adapter, n)
        if v is not None and not store.exists(f"{layout.version_key(customer, adapter, n)}/{layout.TOMBSTONE}"):
            return v
    return None


def resolve_latest(store: Store, customer: str, adapter: str) -> AdapterVersion | None:
    """The newest complete version, or None if the adapter has none."""
    got = read_pointer(store, layout.latest_key(customer, adapter))
    if got is None or not got[0].get("farm_json"):
        return newest_complete(store, customer, adapter)  # first publish died before the pointer moved
    pointer = got[0]
    n = int(pointer["version"])
    raw = pointer["farm_json"].encode()
    vkey = layout.version_key(customer, adapter, n)
    current = parse_farm_json(raw, customer=customer, adapter=adapter, version=n, uri=store.uri(vkey))
    for _ in range(MAX_PROBES):
        nxt = n + 1
        if not store.exists(f"{layout.version_key(customer, adapter, nxt)}/{layout.FARM_JSON}"):
            return current
        # Rare: the pointer lags. Follow it, skipping a version whose delete is half done.
        v = read_version(store, customer, adapter, nxt)
        n = nxt
        if v is not None and not store.exists(f"{layout.version_key(customer, adapter, nxt)}/{layout.TOMBSTONE}"):
            current = v
    return current


def resolve(store: Store, ref: AdapterRef) -> AdapterVersion:
    """A parsed ref to a complete version; AdapterNotFound (saying why, where it can) otherwise."""
    c, a = ref.customer, ref.adapter
    if ref.alias is not None:
        got = read_pointer(store, layout.alias_key(c, a, ref.alias))
        if got is None:
            raise AdapterNotFound(f"no adapter {ref}: no alias {ref.alias!r} on {ref.name}")
        n = int(got[0]["version"])
        v = read_version(store, c, a, n)
        if v is None:
            raise AdapterNotFound(f"{ref} points at v{n}, which is {why_missing(store, c, a, n)}")
        return v
    if ref.version is not None:
        v = read_version(store, c, a, ref.version)
        if v is None:
            raise AdapterNotFound(f"no adapter {ref}: {why_missing(store, c, a, ref.version)}")
        return v
    v = resolve_latest(store, c, a)
    if v is None:
        raise AdapterNotFound(f"no adapter {ref}: no published version")
    return v


def why_missing(store: Store, customer: str, adapter: str, n: int) -> str:
    # Only on the error path, so the extra request costs nothing on the hot path.
    raw = store.read(f"{layout.version_key(customer, adapter, n)}/{layout.TOMBSTONE}")
    if raw is not None:
        try:
            rec = json.loads(raw)
            return f"deleted at {rec.get('deleted_at')} by {rec.get('by')}"
        except ValueError:
            return "deleted"
    return "not published (or not complete yet)"
