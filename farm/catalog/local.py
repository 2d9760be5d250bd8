"""The catalog on a local (or shared POSIX) directory.

Atomicity comes from the filesystem: objects are written to a temporary file and renamed into place
(readers never see partial bytes); exclusive create is a hard link, which fails if the name exists;
compare-and-swap holds an flock on a sidecar lock file while it compares and renames.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from farm.catalog.store import Entry, Store
from farm.errors import CatalogError

TMP_PREFIX = ".tmp-"


def _tag(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class LocalStore(Store):
    """A catalog rooted at a directory (`file:///abs/path` or a plain path)."""

    def __init__(self, url: str):
        if url.startswith("file://"):
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise CatalogError(f"catalog URL {url!r}: file:// URLs must be local (file:///path)")
            path = Path(unquote(parsed.path))
        else:
            path = Path(url).expanduser()
        self.root = path.resolve()
        self.url = self.root.as_uri()
        self.requests = 0

    def _path(self, key: str) -> Path:
        # Keys are built from validated names; this is a last line of defence against escaping root.
        if key.startswith("/") or ".." in key.split("/"):
            raise CatalogError(f"refusing storage key {key!r} outside the catalog root")
        return self.root / key if key else self.root

    @contextmanager
    def _io(self, key: str):
        self.requests += 1
        try:
            yield
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as exc:
            raise CatalogError(f"catalog {self.uri(key)}: {exc.strerror or exc}") from exc

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"

    def _put_tmp(self, path: Path, data: bytes) -> Path:
        tmp = self._tmp(path)
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        with self._io(key):
            try:
                data = self._path(key).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        return data, _tag(data)

    def exists(self, key: str) -> bool:
        with self._io(key):
            return self._path(key).is_file()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._io(key):
            os.replace(self._put_tmp(path, data), path)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._io(key):
            tmp = self._put_tmp(path, data)
            try:
                os.link(tmp, path)  # atomic and fails if the name exists: exclusive create
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink()

    def swap(self, key: str, data: bytes, tag: str | None) -> bool:
        path = self._path(key)
        if tag is None:
            return self.create(key, data)
        with self._io(key):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / f".{path.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    current = path.read_bytes()
                except FileNotFoundError:
                    return False
                if _tag(current) != tag:
                    return False
                os.replace(self._put_tmp(path, data), path)
                return True

    def upload(self, key: str, src: Path) -> None:
        path = self._path(key)
        with self._io(key):
            tmp = self._tmp(path)
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)

    def download(self, key: str, dst: Path) -> None:
        with self._io(key):
            shutil.copyfile(self._path(key), dst)

    def children(self, prefix: str) -> list[str]:
        with self._io(prefix):
            try:
                names = os.listdir(self._path(prefix))
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted(n for n in names if not n.startswith("."))

    def walk(self, prefix: str) -> list[Entry]:
        top = self._path(prefix)
        out = []
        with self._io(prefix):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    p = Path(dirpath) / name
                    try:
                        size = p.stat().st_size
                    except FileNotFoundError:
                        continue
                    out.append(Entry(p.relative_to(self.root).as_posix(), size))
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            with self._io(key):
                path.unlink(missing_ok=True)
                lock = path.parent / f".{path.name}.lock"
                lock.unlink(missing_ok=True)
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        # Remove folders left empty by deletes, up to the root, so listings don't show ghosts.
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
