"""From the request's `model` to what serves it: the base model, or one exact adapter version.

Order matters for tenancy: the ref is parsed by the catalog's strict parser (bad -> 400) and checked
against the caller's customer (foreign -> 404, the same answer as a missing adapter) before any
storage request. Resolutions are reused for at most `ttl_s`, which bounds how long after a publish a
request can still get the previous version. Each resolved version is assigned its served base from
its lineage (bases.py); a version of a base not served here is refused (422).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from farm.errors import AdapterNotFound, CatalogError, IntegrityError, RefError
from farm.serve.auth import Principal
from farm.serve.bases import ServedBase, base_of
from farm.serve.limits import ApiError, not_found


@dataclass(frozen=True)
class Target:
    """What a request runs on. For the base model `version` is None and `ref` is its served name."""

    ref: str  # the exact name every response carries: customer/adapter@vN or the base model's name
    name: str  # customer/adapter (metrics tag) or the base name
    version: Any = None  # farm.catalog AdapterVersion
    base: str = ""  # the served base's name: whose replicas run it

    @property
    def vid(self) -> str | None:
        return None if self.version is None else self.version.id


def catalog_error(exc: Exception, model: str) -> ApiError:
    """Catalog failures as HTTP errors: not found 404, bad ref 400, storage trouble 502."""
    if isinstance(exc, AdapterNotFound):
        return not_found(model)
    if isinstance(exc, RefError):
        return ApiError(400, str(exc))
    if isinstance(exc, IntegrityError):
        return ApiError(502, f"adapter {model!r} failed verification in the catalog: {exc}", "adapter_error")
    return ApiError(502, f"catalog unavailable: {exc}", "catalog_error")


class Resolver:
    """Thread-safe; blocking (call from a worker thread)."""

    def __init__(self, catalog_url: str, bases: list[ServedBase] | str, ttl_s: float = 1.0):
        """`bases`: the served bases (a plain name = one base with no fingerprint)."""
        self.catalog_url = catalog_url
        self.bases = [ServedBase(bases, bases)] if isinstance(bases, str) else list(bases)
        self._by_name = {b.name: b for b in self.bases}
        self.ttl_s = ttl_s
        self._catalog = None
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    @property
    def catalog(self):
        if self._catalog is None:
            from farm.catalog import Catalog

            self._catalog = Catalog(self.catalog_url)
        return self._catalog

    def resolve(self, principal: Principal, model: str) -> Target:
        if model in self._by_name:
            return Target(ref=model, name=model, base=model)
        from farm.catalog import parse_ref

        try:
            ref = parse_ref(model)
        except RefError as exc:
            raise ApiError(400, str(exc)) from None
        if not principal.may_use(ref.customer):
            raise not_found(model)
        key = str(ref)
        started = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and started - hit[0] < self.ttl_s:
            version = hit[1]
        else:
            try:
                version = self.catalog.resolve(key)
            except CatalogError as exc:
                raise catalog_error(exc, model) from None
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                old = self._cache.get(key)
                # A slow resolve that started before a newer one finished must not put back an older answer.
                if old is None or old[0] <= started:
                    self._cache[key] = (started, version)
        base = base_of(version.ref, version.metadata or {}, self.bases)
        return Target(ref=version.ref, name=f"{ref.customer}/{ref.adapter}", version=version, base=base.name)

    def models(self, principal: Principal) -> list[dict]:
        """Every served base plus every adapter the caller may use (latest version of each), with
        `parent`: the served base it runs on (None: its base is not served here)."""
        data = [{"id": b.name, "object": "model", "owned_by": "farm", "created": 0}
                for b in self.bases]
        try:
            versions = self.catalog.list(customer=None if principal.admin else principal.customer)
        except CatalogError as exc:
            raise catalog_error(exc, "*") from None
        for v in versions:
            created = 0
            try:
                parent = base_of(v.ref, v.metadata or {}, self.bases).name
            except ApiError:
                parent = None
            data.append(
                {
                    "id": f"{v.customer}/{v.adapter}",
                    "object": "model",
                    "owned_by": v.customer,
                    "created": created,
                    "version": v.ref,
                    "parent": parent,
                    "task": (v.metadata or {}).get("task", "causal_lm"),
                }
            )
        return data
