"""A tiny object-store interface under the catalog, with the two conditional writes it needs.

Keys are '/'-joined paths relative to the catalog root. Implementations: `LocalStore` (a directory;
exclusive create by hard link, compare-and-swap under a lock file), `S3Store` (S3 conditional writes:
`If-None-Match: *` and `If-Match: <etag>`) and `FsspecStore` (any other fsspec URL, best effort).
Every method is one storage request (S3: one HTTP request, counted in `requests` for the bench).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Entry(NamedTuple):
    """One stored object found by `walk`."""

    key: str
    size: int


class Store:
    """Interface; see the module docstring. `tag` values are opaque version tags (S3: the ETag)."""

    url: str
    requests: int = 0

    def connect(self) -> None:
        """Set up the client now, without a request (S3: its session and credentials), so that the
        first request does not pay for it (a serving replica at start). Optional: no-op here."""

    def uri(self, key: str) -> str:
        """The fsspec URL of a key (for users and `AdapterVersion.uri`)."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        got = self.read_tagged(key)
        return None if got is None else got[0]

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, tag) or None if missing; pass the tag to `swap`."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Write an object; readers see the old or the new bytes, never a partial object."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Write only if the key does not exist (atomically); False if it already existed."""
        raise NotImplementedError

    def swap(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: write only if the object's tag is still `tag` (None: must not exist)."""
        raise NotImplementedError

    def upload(self, key: str, src: Path) -> None:
        """Copy a local file to the key (atomically visible, like `write`)."""
        raise NotImplementedError

    def download(self, key: str, dst: Path) -> None:
        """Copy the object to a local file; FileNotFoundError if missing."""
        raise NotImplementedError

    def children(self, prefix: str) -> list[str]:
        """Names directly under a prefix (files and 'folders'), sorted; [] if none. Never cached."""
        raise NotImplementedError

    def walk(self, prefix: str) -> list[Entry]:
        """Every object under a prefix, recursively (admin paths only: gc, delete)."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Delete objects; missing ones are ignored."""
        raise NotImplementedError


def open_store(url: str) -> Store:
    """The store for a catalog URL: file:// or a plain path, s3://, or any other fsspec URL."""
    from farm.errors import CatalogError

    if not isinstance(url, str) or not url.strip():
        raise CatalogError(f"catalog URL {url!r} is empty; set FARM_CATALOG or FARM_HOME")
    if url.startswith("file://") or "://" not in url:
        from farm.catalog.local import LocalStore

        return LocalStore(url)
    if url.startswith(("s3://", "s3a://")):
        from farm.catalog.s3 import S3Store

        return S3Store(url)
    from farm.catalog.fsspec_store import FsspecStore

    return FsspecStore(url)
