"""The catalog on any other fsspec URL (gs://, az://, memory://, ...): best effort.

These filesystems give no portable conditional write through fsspec, so exclusive create and
compare-and-swap here are check-then-write: correct for one writer at a time, not under races.
The guarantees in docs/catalog.md are tested on local directories and S3 only.
"""

from __future__ import annotations

from pathlib import Path

from farm.catalog.store import Entry, Store
from farm.errors import CatalogError


class FsspecStore(Store):
    """A catalog on a generic fsspec filesystem (no listing cache)."""

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
        except (ImportError, ValueError) as exc:
            raise CatalogError(f"catalog URL {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.requests = 0

    def _p(self, key: str) -> str:
        self.requests += 1
        return f"{self.root}/{key}" if key else self.root

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        import hashlib

        try:
            data = self.fs.cat_file(self._p(key))
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self.fs.isfile(self._p(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def create(self, key: str, data: bytes) -> bool:
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    def swap(self, key: str, data: bytes, tag: str | None) -> bool:
        got = self.read_tagged(key)
        if (got[1] if got else None) != tag:
            return False
        self.write(key, data)
        return True

    def upload(self, key: str, src: Path) -> None:
        self.fs.put_file(str(src), self._p(key))

    def download(self, key: str, dst: Path) -> None:
        self.fs.get_file(self._p(key), str(dst))

    def children(self, prefix: str) -> list[str]:
        try:
            names = self.fs.ls(self._p(prefix), detail=False)
        except FileNotFoundError:
            return []
        names = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        return sorted(n for n in names if n and not n.startswith("."))

    def walk(self, prefix: str) -> list[Entry]:
        base = self._p(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        strip = len(self.root) + 1
        return sorted(Entry(p[strip:], i.get("size", 0)) for p, i in found.items())

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.fs.rm_file(self._p(key))
            except FileNotFoundError:
                pass
