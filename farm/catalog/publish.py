"""Publishing a version: claim a number, upload the files, write farm.json last, move `latest`.

    1. claim v<N>: exclusive create of v<N>/.claim, starting after the latest pointer; a taken
       number (a racing publisher, or debris of a dead one) just means try N+1
    2. upload every file under v<N>/
    3. with an idempotency key: record key -> N (compare-and-swap)
    4. write v<N>/farm.json (exclusive create): from here on the version is visible
    5. move latest.json forward (compare-and-swap; never backwards)
A publisher killed before 4 leaves an invisible claimed folder that blocks nothing; gc removes it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farm.catalog import layout
from farm.catalog.metadata import AdapterVersion, farm_record, hash_file, parse_farm_json
from farm.catalog.peft_folder import describe_adapter, scan_folder
from farm.catalog.pointers import advance_latest
from farm.catalog.resolve import read_pointer, read_version, version_numbers
from farm.catalog.store import Store
from farm.errors import CatalogError

MAX_CLAIM_TRIES = 1000


def who() -> str:
    """user@host:pid, recorded in claims and tombstones so debris and deletes are attributable."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "?"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def claim_version(store: Store, customer: str, adapter: str, note: dict[str, Any]) -> int:
    """Take the next free version number with an exclusive create; returns it."""
    got = read_pointer(store, layout.latest_key(customer, adapter))
    if got is not None:
        start = int(got[0]["version"]) + 1
    else:
        # No pointer yet: one listing of this adapter's folder (never the bucket) finds the highest claim.
        nums = version_numbers(store, customer, adapter)
        start = (nums[-1] + 1) if nums else 1
    body = layout.dumps({**note, "claimed": time.time(), "claimed_at": now_iso(), "by": who()})
    for n in range(start, start + MAX_CLAIM_TRIES):
        if store.create(f"{layout.version_key(customer, adapter, n)}/{layout.CLAIM}", body):
            return n
    raise CatalogError(
        f"{customer}/{adapter}: no free version number in v{start}..v{start + MAX_CLAIM_TRIES - 1}; "
        "run `farm adapters gc` to clear debris"
    )


def _previous(store: Store, customer: str, adapter: str, key: str) -> tuple[AdapterVersion | None, str | None]:
    """The complete version an idempotency key already produced (if any), and the record's tag."""
    got = read_pointer(store, layout.idempotency_key(customer, adapter, key))
    if got is None:
        return None, None
    rec, tag = got
    n = int(rec["version"])
    v = read_version(store, customer, adapter, n)
    if v is not None and v.idempotency_key == key:
        tomb = store.exists(f"{layout.version_key(customer, adapter, n)}/{layout.TOMBSTONE}")
        return (None if tomb else v), tag
    return None, tag


def _hash(path: Path) -> tuple[str, int]:
    try:
        return hash_file(path)  # never through a symlink (scan_folder refused them; this catches a swap since)
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read as a plain file ({exc.strerror}); refusing to publish it") from None


def publish(
    store: Store,
    customer: str,
    adapter: str,
    src_dir: Path,
    metadata: dict[str, Any],
    *,
    idempotency_key: str | None = None,
) -> AdapterVersion:
    """Publish src_dir as the next version (see the module docstring for the protocol)."""
    src_dir = Path(src_dir)
    files = scan_folder(src_dir)
    peft_info = describe_adapter(src_dir, files)
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"publish {customer}/{adapter}: metadata is not JSON-serialisable ({exc})") from None
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
        raise CatalogError(f"publish {customer}/{adapter}: idempotency_key must be a non-empty string")
    key_tag = None
    if idempotency_key:
        done, key_tag = _previous(store, customer, adapter, idempotency_key)
        if done is not None:
            return done
    hashed = {name: _hash(path) for name, path in files.items()}

    n = claim_version(store, customer, adapter, {"idempotency_key": idempotency_key})
    vkey = layout.version_key(customer, adapter, n)
    for name, path in files.items():
        store.upload(f"{vkey}/{name}", path)
    # Verify nothing changed under us between hashing and upload (a trainer still writing, say).
    for name, path in files.items():
        if _hash(path) != hashed[name]:
            raise CatalogError(f"{path} changed while it was being published; v{n} left unpublished")

    if idempotency_key:
        rec = layout.dumps({"version": n, "key": idempotency_key, "at": now_iso()})
        if not store.swap(layout.idempotency_key(customer, adapter, idempotency_key), rec, key_tag):
            done, _ = _previous(store, customer, adapter, idempotency_key)
            if done is not None:
                return done  # a concurrent retry of the same job won; our v<n> stays invisible debris
            raise CatalogError(
                f"publish {customer}/{adapter}: another publish with idempotency key {idempotency_key!r} "
                "is in progress"
            )

    if store.exists(f"{vkey}/{layout.TOMBSTONE}"):
        # gc took this claim for debris (we outlived its grace period); publishing now would expose
        # a version whose files are gone.
        raise CatalogError(f"publish {customer}/{adapter}: v{n} was reclaimed by gc while uploading; retry")
    meta = dict(metadata)
    meta.setdefault("peft", peft_info)
    record = farm_record(customer, adapter, n, now_iso(), hashed, meta, idempotency_key)
    raw = layout.dumps(record)
    if not store.create(f"{vkey}/{layout.FARM_JSON}", raw):
        raise CatalogError(f"{store.uri(vkey)}/farm.json already exists; refusing to overwrite a published version")
    v = parse_farm_json(raw, customer=customer, adapter=adapter, version=n, uri=store.uri(vkey))
    advance_latest(store, v, raw)
    return v
