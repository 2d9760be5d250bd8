"""`Catalog`: the one object training, serving and the CLI use to reach published adapters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from farm.catalog import admin
from farm.catalog.metadata import AdapterVersion
from farm.catalog.refs import AdapterRef, check_part, parse_ref
from farm.catalog.resolve import read_version, resolve_latest, version_numbers
from farm.catalog.store import Store, open_store
from farm.errors import AdapterNotFound, CatalogError, RefError


class Catalog:
    """Adapters under one fsspec URL (default: farm.settings.catalog_url()).

    `customer=` scopes every operation to that tenant: anything about another customer raises
    AdapterNotFound, exactly as if it did not exist.
    """

    def __init__(self, url: str | None = None, *, customer: str | None = None):
        from farm import settings

        self.url = url or settings.catalog_url()
        self.customer = check_part("customer", customer) if customer is not None else None
        self.store: Store = open_store(self.url)

    def connect(self) -> None:
        """Set up the storage client now, without a request (see Store.connect)."""
        self.store.connect()

    def ping(self) -> bool:
        """One cheap read (does a key that no catalog holds exist?): the client's first request also
        runs its one-time set-up (~50-75 ms on S3 here), which a serving replica pays at start this way."""
        return self.store.exists(".farm-ping")

    def __repr__(self) -> str:
        scope = f", customer={self.customer!r}" if self.customer else ""
        return f"Catalog({self.store.url!r}{scope})"

    # -- scoping -------------------------------------------------------------------------------

    def _scoped(self, customer: str, shown: str) -> str:
        check_part("customer", customer)
        if self.customer is not None and customer != self.customer:
            raise AdapterNotFound(f"no adapter {shown}")  # same words as a real miss: no existence leak
        return customer

    def _ref(self, ref: str | AdapterRef) -> AdapterRef:
        r = parse_ref(ref)
        self._scoped(r.customer, str(r))
        return r

    # -- reading -------------------------------------------------------------------------------

    def resolve(self, ref: str | AdapterRef) -> AdapterVersion:
        """`customer/adapter` (latest), `@vN` (pinned) or `@alias` to a complete version; O(1) requests.

        Also takes a version id (`customer/adapter@vN#<hex>`, `AdapterVersion.id`): that exact version
        or AdapterNotFound.
        """
        from farm.catalog.resolve import resolve

        if isinstance(ref, str) and "#" in ref:
            return self._by_id(ref)
        return resolve(self.store, self._ref(ref))

    def _by_id(self, vid: str) -> AdapterVersion:
        from farm.catalog.resolve import resolve

        ref, _, digest = vid.partition("#")
        r = self._ref(ref)
        if r.version is None or not re.fullmatch(r"[0-9a-f]{12,64}", digest):
            raise RefError(f"bad version id {vid!r}: expected customer/adapter@vN#<12+ hex digits>")
        v = resolve(self.store, r)
        if not v.digest.startswith(digest):
            raise AdapterNotFound(f"no adapter version {vid}: {r} has a different farm.json (id {v.id})")
        return v

    def versions(self, customer: str, adapter: str) -> list[AdapterVersion]:
        """Every complete version of one adapter, oldest first (one listing + one read per version)."""
        self._scoped(customer, f"{customer}/{adapter}")
        check_part("adapter", adapter)
        found = (read_version(self.store, customer, adapter, n) for n in version_numbers(self.store, customer, adapter))
        return [v for v in found if v is not None]

    def customers(self) -> list[str]:
        """Customer names in the catalog (just the scoped one for a scoped catalog)."""
        if self.customer is not None:
            return [self.customer]
        return [c for c in self.store.children("") if _valid(c)]

    def list(self, customer: str | None = None) -> list[AdapterVersion]:
        """The latest version of every adapter, of one customer (reading only its prefix) or of all."""
        if customer is not None:
            self._scoped(customer, f"{customer}/*")
        out = []
        for c in [customer] if customer else self.customers():
            for a in self.store.children(c):
                if _valid(a):
                    v = resolve_latest(self.store, c, a)
                    if v is not None:
                        out.append(v)
        return out

    def fetch(self, ref: str | AdapterRef | AdapterVersion, dest: Path | None = None) -> Path:
        """Download a version, verifying every file's sha256, into dest (missing or empty) or the
        local cache ($FARM_HOME/cache/adapters, keyed by the immutable version id; reused)."""
        from farm import settings
        from farm.catalog.fetch import fetch

        if isinstance(ref, AdapterVersion):
            self._scoped(ref.customer, ref.ref)
            v = ref
        else:
            v = self.resolve(ref)
        return fetch(self.store, v, Path(dest) if dest is not None else None, settings.farm_home() / "cache" / "adapters")

    # -- writing -------------------------------------------------------------------------------

    def publish(
        self,
        customer: str,
        adapter: str,
        src_dir: Path,
        metadata: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AdapterVersion:
        """Publish a PEFT LoRA adapter folder as the next version; farm.json is written last.

        With `idempotency_key` (the training job id), a key that already produced a complete version
        returns that version instead of publishing again.
        """
        from farm.catalog.publish import publish

        self._scoped(customer, f"{customer}/{adapter}")
        check_part("adapter", adapter)
        return publish(self.store, customer, adapter, Path(src_dir), dict(metadata or {}), idempotency_key=idempotency_key)

    def import_adapter(self, path: Path, name: str, *, metadata: dict[str, Any] | None = None) -> AdapterVersion:
        """Publish an existing PEFT adapter folder (made anywhere) as a new version of `customer/adapter`."""
        r = self._ref(name)
        if r.version is not None or r.alias is not None:
            raise CatalogError(f"import into {r}: give customer/adapter without @...; the version is assigned")
        meta = {"source": "import", "imported_from": str(Path(path).expanduser().absolute()), **(metadata or {})}
        return self.publish(r.customer, r.adapter, Path(path).expanduser(), meta)

    def delete(self, ref: str | AdapterRef, *, force: bool = False) -> dict[str, Any]:
        """Delete one version (`customer/adapter@vN`), recording who and when; refuses a version an
        alias points at unless `force` (which removes those aliases)."""
        return admin.delete(self.store, self._ref(ref), force=force)

    def aliases(self, ref: str | AdapterRef) -> dict[str, int]:
        """alias -> version of one adapter."""
        r = self._ref(ref)
        return admin.aliases(self.store, r.customer, r.adapter)

    def set_alias(self, ref: str | AdapterRef, alias: str, *, expect: Any = admin.ANY) -> int | None:
        """Point `alias` at the version `ref` resolves to (compare-and-swap). With `expect` (a version
        number, or None for a new alias) refuse if the alias currently points elsewhere. Returns the
        version it pointed at before (None if new)."""
        return admin.set_alias(self.store, self._ref(ref), alias, expect=expect)

    def remove_alias(self, ref: str | AdapterRef, alias: str) -> int:
        """Remove an alias; returns the version it pointed at."""
        r = self._ref(ref)
        return admin.remove_alias(self.store, r.customer, r.adapter, alias)

    def gc(self, grace_seconds: float = 24 * 3600) -> dict[str, list[str]]:
        """Remove debris of dead publishers older than the grace period, finish interrupted deletes,
        repair lagging `latest` pointers."""
        if grace_seconds < 0:
            raise CatalogError(f"gc grace period must be >= 0 seconds, got {grace_seconds}")
        return admin.gc(self.store, self.customers(), grace_seconds)


def _valid(name: str) -> bool:
    try:
        check_part("name", name)
        return True
    except CatalogError:
        return False


__all__ = ["Catalog"]
