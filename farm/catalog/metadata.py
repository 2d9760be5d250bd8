"""`AdapterVersion` and its farm.json record: what a published version is, and how it is verified."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.catalog.refs import check_file_name
from farm.errors import IntegrityError

FORMAT = 1


@dataclass(frozen=True)
class AdapterVersion:
    """One complete, immutable version of an adapter, as recorded in its farm.json."""

    customer: str
    adapter: str
    version: int
    uri: str
    """fsspec URL of the version folder."""
    created: str
    """ISO-8601 UTC time the version was published."""
    files: dict[str, str]
    """File name -> sha256 hex of every file in the version (farm.json excluded)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """File name -> size in bytes."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """What publish was given: metrics, metrics_history, job_id, manifest, ..."""
    digest: str = ""
    """sha256 of the farm.json bytes; makes `id` unique even if a version number were ever reused."""
    idempotency_key: str | None = None

    @property
    def name(self) -> str:
        return f"{self.customer}/{self.adapter}"

    @property
    def ref(self) -> str:
        """The pinned ref, `customer/adapter@vN`."""
        return f"{self.name}@v{self.version}"

    @property
    def id(self) -> str:
        """Immutable unique id, `customer/adapter@vN#<12 hex of farm.json's sha256>`; a cache key."""
        return f"{self.ref}#{self.digest[:12]}"

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.metadata.get("metrics") or {})

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON view for `farm adapters show --json` and for other services."""
        return {
            "ref": self.ref,
            "id": self.id,
            "customer": self.customer,
            "adapter": self.adapter,
            "version": self.version,
            "uri": self.uri,
            "created": self.created,
            "files": {n: {"sha256": h, "size": self.sizes.get(n)} for n, h in sorted(self.files.items())},
            "size": self.size,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "idempotency_key": self.idempotency_key,
        }


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, streamed."""
    h = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: a file swapped for a symlink after the folder was scanned fails here, not hashes a host file
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as f:
        while chunk := f.read(2**20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def farm_record(
    customer: str,
    adapter: str,
    version: int,
    created: str,
    files: dict[str, tuple[str, int]],
    metadata: dict[str, Any],
    idempotency_key: str | None,
) -> dict[str, Any]:
    """The farm.json object for a new version."""
    return {
        "format": FORMAT,
        "customer": customer,
        "adapter": adapter,
        "version": version,
        "created": created,
        "files": {n: {"sha256": h, "size": s} for n, (h, s) in sorted(files.items())},
        "idempotency_key": idempotency_key,
        "metadata": metadata,
    }


def parse_farm_json(raw: bytes, *, customer: str, adapter: str, version: int, uri: str) -> AdapterVersion:
    """Parse farm.json read from storage; anything malformed or misplaced is an IntegrityError."""
    where = f"{uri}/farm.json"
    try:
        rec = json.loads(raw)
        files = {check_file_name(n): (str(v["sha256"]), int(v["size"])) for n, v in rec["files"].items()}
        placed = (rec["customer"], rec["adapter"], int(rec["version"]))
        metadata = rec.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError("metadata is not an object")
    except Exception as exc:  # noqa: BLE001 - any malformation means the same thing to the caller
        raise IntegrityError(f"{where} is unreadable or malformed ({type(exc).__name__}: {exc})") from None
    if placed != (customer, adapter, version):
        # A farm.json copied from elsewhere must not pass as this version.
        raise IntegrityError(f"{where} describes {placed[0]}/{placed[1]}@v{placed[2]}, not this version")
    return AdapterVersion(
        customer=customer,
        adapter=adapter,
        version=version,
        uri=uri,
        created=str(rec.get("created", "")),
        files={n: h for n, (h, _) in files.items()},
        sizes={n: s for n, (_, s) in files.items()},
        metadata=metadata,
        digest=hashlib.sha256(raw).hexdigest(),
        idempotency_key=rec.get("idempotency_key"),
    )
