"""Aliases (moved by compare-and-swap), recorded deletes, and gc of debris left by dead publishers."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from farm.catalog import layout
from farm.catalog.pointers import repair_latest, retreat_latest
from farm.catalog.publish import now_iso, who
from farm.catalog.refs import AdapterRef, check_alias
from farm.catalog.resolve import read_pointer, resolve, why_missing
from farm.catalog.store import Store
from farm.errors import AdapterNotFound, CatalogError

ANY: Any = object()
"""`expect=ANY`: move an alias whatever it points at now (still compare-and-swap against races)."""
MAX_CAS_TRIES = 50


def aliases(store: Store, customer: str, adapter: str) -> dict[str, int]:
    """alias -> version for one adapter (one listing plus one read per alias)."""
    out = {}
    for name in store.children(layout.aliases_key(customer, adapter)):
        if name.endswith(".json"):
            alias = name[: -len(".json")]
            got = read_pointer(store, layout.alias_key(customer, adapter, alias))
            if got is not None:
                out[alias] = int(got[0]["version"])
    return out


def _fmt(n: int | None) -> str:
    return "unset" if n is None else f"v{n}"


def set_alias(store: Store, target: AdapterRef, alias: str, *, expect: Any = ANY) -> int | None:
    """Point `alias` at the version `target` resolves to; returns the version it pointed at before.

    `expect` (a version number, or None for "must not exist yet") makes it a checked move: if the
    alias points elsewhere, nothing changes and CatalogError says where it points.
    """
    check_alias(alias)
    v = resolve(store, target)
    key = layout.alias_key(v.customer, v.adapter, alias)
    for _ in range(MAX_CAS_TRIES):
        got = read_pointer(store, key)
        current = int(got[0]["version"]) if got else None
        if expect is not ANY and current != expect:
            raise CatalogError(
                f"alias {v.name}@{alias} is {_fmt(current)}, expected {_fmt(expect)}; not moved"
            )
        body = layout.dumps({"version": v.version, "set_at": now_iso(), "by": who(), "previous": current})
        if store.swap(key, body, got[1] if got else None):
            return current
    raise CatalogError(f"alias {v.name}@{alias}: could not move it after {MAX_CAS_TRIES} tries (contention)")


def remove_alias(store: Store, customer: str, adapter: str, alias: str) -> int:
    """Remove an alias; returns the version it pointed at."""
    check_alias(alias)
    key = layout.alias_key(customer, adapter, alias)
    got = read_pointer(store, key)
    if got is None:
        raise AdapterNotFound(f"no alias {alias!r} on {customer}/{adapter}")
    store.delete([key])
    return int(got[0]["version"])


def delete(store: Store, ref: AdapterRef, *, force: bool = False) -> dict[str, Any]:
    """Delete one version, recording a tombstone; refuses a version an alias points at unless forced."""
    if ref.version is None:
        raise CatalogError(f"delete {ref}: name the version to delete, e.g. {ref.name}@v1")
    c, a, n = ref.customer, ref.adapter, ref.version
    vkey = layout.version_key(c, a, n)
    raw = store.read(f"{vkey}/{layout.FARM_JSON}")
    if raw is None:
        raise AdapterNotFound(f"no adapter {ref}: {why_missing(store, c, a, n)}")
    pointing = sorted(al for al, m in aliases(store, c, a).items() if m == n)
    if pointing and not force:
        raise CatalogError(
            f"{ref} is the target of alias(es) {', '.join(pointing)}; move them first or delete with --force"
        )
    record = {
        "ref": str(ref), "deleted_at": now_iso(), "by": who(), "forced": force,
        "aliases_removed": pointing, "farm_json": raw.decode(),
    }
    # Tombstone first: a delete cut short is visible as unfinished, and gc completes it.
    store.write(f"{vkey}/{layout.TOMBSTONE}", layout.dumps(record))
    store.delete([layout.alias_key(c, a, al) for al in pointing])
    retreat_latest(store, c, a, n)
    _remove_files(store, vkey, [e.key for e in store.walk(vkey)])
    return record


def _remove_files(store: Store, vkey: str, keys: list[str]) -> None:
    # farm.json goes first so the version is invisible before any of its files disappear.
    farm = f"{vkey}/{layout.FARM_JSON}"
    keep = {f"{vkey}/{layout.CLAIM}", f"{vkey}/{layout.TOMBSTONE}"}
    if farm in keys:
        store.delete([farm])
    store.delete([k for k in keys if k not in keep and k != farm])


def gc(store: Store, customers: list[str], grace_seconds: float) -> dict[str, list[str]]:
    """Remove debris of publishers that died before farm.json (older than the grace period),
    finish interrupted deletes, and repair lagging `latest` pointers. Returns what it did."""
    report: dict[str, list[str]] = {"removed_incomplete": [], "finished_deletes": [], "repaired_latest": []}
    now = time.time()
    for c in customers:
        for a in store.children(c):
            by_version: dict[int, list[str]] = defaultdict(list)
            for e in store.walk(layout.adapter_key(c, a)):
                rel = e.key.split("/")
                if len(rel) >= 4 and (m := layout.VERSION_DIR.fullmatch(rel[2])):
                    by_version[int(m.group(1))].append(e.key)
            for n, keys in sorted(by_version.items()):
                vkey = layout.version_key(c, a, n)
                names = {k[len(vkey) + 1 :] for k in keys}
                extra = names - {layout.CLAIM, layout.TOMBSTONE}
                if layout.TOMBSTONE in names:
                    if extra:
                        _remove_files(store, vkey, keys)
                        report["finished_deletes"].append(f"{c}/{a}@v{n}")
                elif layout.FARM_JSON not in names and _age(store, vkey, now) >= grace_seconds:
                    tomb = {"reason": "incomplete publish removed by gc", "deleted_at": now_iso(), "by": who(),
                            "files": sorted(extra)}
                    store.write(f"{vkey}/{layout.TOMBSTONE}", layout.dumps(tomb))
                    _remove_files(store, vkey, keys)
                    report["removed_incomplete"].append(f"{c}/{a}@v{n}")
            if by_version and repair_latest(store, c, a):
                report["repaired_latest"].append(f"{c}/{a}")
    return report


def _age(store: Store, vkey: str, now: float) -> float:
    raw = store.read(f"{vkey}/{layout.CLAIM}")
    try:
        return now - float(json.loads(raw)["claimed"])
    except (TypeError, ValueError, KeyError):
        return float("inf")  # no readable claim: nothing legitimate is writing here


__all__ = ["ANY", "aliases", "delete", "gc", "remove_alias", "set_alias"]
