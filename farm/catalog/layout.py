"""Where things live under the catalog root. The only module that spells storage keys.

    <customer>/<adapter>/v<N>/.claim          exclusive-create marker: version N is taken (kept forever)
    <customer>/<adapter>/v<N>/<files>         the adapter as PEFT saved it, plus extras (loss_curve.png)
    <customer>/<adapter>/v<N>/farm.json       written last: the version is complete and visible
    <customer>/<adapter>/v<N>/.deleted        tombstone: who deleted it, when, and its farm.json
    <customer>/<adapter>/latest.json          pointer to the newest complete version (a hint; see docs)
    <customer>/<adapter>/aliases/<alias>.json named pointer (e.g. prod), moved by compare-and-swap
    <customer>/<adapter>/keys/<hash>.json     idempotency key (training job id) -> version
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

FARM_JSON = "farm.json"
CLAIM = ".claim"
TOMBSTONE = ".deleted"
LATEST = "latest.json"
VERSION_DIR = re.compile(r"v([1-9][0-9]*)")


def adapter_key(customer: str, adapter: str) -> str:
    return f"{customer}/{adapter}"


def version_key(customer: str, adapter: str, version: int) -> str:
    return f"{customer}/{adapter}/v{version}"


def file_key(customer: str, adapter: str, version: int, name: str) -> str:
    return f"{version_key(customer, adapter, version)}/{name}"


def latest_key(customer: str, adapter: str) -> str:
    return f"{customer}/{adapter}/{LATEST}"


def aliases_key(customer: str, adapter: str) -> str:
    """The folder of an adapter's alias pointers."""
    return f"{customer}/{adapter}/aliases"


def alias_key(customer: str, adapter: str, alias: str) -> str:
    return f"{customer}/{adapter}/aliases/{alias}.json"


def idempotency_key(customer: str, adapter: str, key: str) -> str:
    # Hashed: job ids are caller-chosen strings and must not shape storage keys.
    return f"{customer}/{adapter}/keys/{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"


def version_numbers(names: list[str]) -> list[int]:
    """Version numbers among the names directly under an adapter folder, ascending."""
    return sorted(int(m.group(1)) for n in names if (m := VERSION_DIR.fullmatch(n)))


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys) for everything the catalog stores."""
    return json.dumps(obj, sort_keys=True, indent=1, default=str).encode()
