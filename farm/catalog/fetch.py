"""Verified download of a version into a folder that stock `PeftModel.from_pretrained` loads.

Files land in a hidden temporary folder next to the destination, are checked against the size and
sha256 recorded in farm.json, and only then is the folder renamed into place, so a destination
either holds the whole verified version or nothing. The default destination is a cache folder keyed
by the version's immutable id, reused when a verified copy is already there (each reuse touches the
folder's marker, which is how `farm gc` tells when it was last used).
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

from farm.catalog import layout
from farm.catalog.metadata import AdapterVersion, hash_file
from farm.catalog.store import Store
from farm.errors import CatalogError, IntegrityError

VERIFIED = ".farm-verified"


def cache_dir(v: AdapterVersion, root: Path) -> Path:
    """Cache folder of a version: <root>/<customer>/<adapter>/v<N>-<digest12>."""
    return root / v.customer / v.adapter / f"v{v.version}-{v.digest[:12]}"


def _cached(v: AdapterVersion, folder: Path) -> bool:
    # The marker is written only after every hash matched; sizes catch later truncation cheaply.
    try:
        if (folder / VERIFIED).read_text().strip() != v.digest:
            return False
        return all((folder / n).stat().st_size == s for n, s in v.sizes.items())
    except OSError:
        return False


def _used(folder: Path) -> None:
    """A cache hit refreshes the marker's time: `farm gc` removes folders not used for its age."""
    try:
        (folder / VERIFIED).touch()
    except OSError:
        pass  # a read-only cache still serves


def fetch(store: Store, v: AdapterVersion, dest: Path | None, cache_root: Path) -> Path:
    """Download and verify v into dest (must be missing or empty) or the cache; returns the folder."""
    use_cache = dest is None
    dest = Path(cache_dir(v, cache_root) if use_cache else dest).expanduser().absolute()
    if use_cache and _cached(v, dest):
        _used(dest)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CatalogError(f"fetch {v.ref}: destination {dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        vkey = layout.version_key(v.customer, v.adapter, v.version)
        for name, want in sorted(v.files.items()):
            local = tmp / name
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.download(f"{vkey}/{name}", local)
            except FileNotFoundError:
                raise IntegrityError(f"{v.ref}: file {name} is missing from {v.uri}") from None
            got, size = hash_file(local)
            if size != v.sizes.get(name, size):
                raise IntegrityError(
                    f"{v.ref}: file {name} is {size} bytes, {v.sizes[name]} were published (truncated or "
                    f"changed behind the catalog's back at {v.uri}/{name})"
                )
            if got != want:
                raise IntegrityError(
                    f"{v.ref}: file {name} has sha256 {got[:16]}..., {want[:16]}... was published "
                    f"(changed behind the catalog's back at {v.uri}/{name})"
                )
        raw = store.read(f"{vkey}/{layout.FARM_JSON}")
        if raw is None or hashlib.sha256(raw).hexdigest() != v.digest:
            raise IntegrityError(f"{v.ref}: farm.json at {v.uri} is missing or changed since it was resolved")
        (tmp / layout.FARM_JSON).write_bytes(raw)
        (tmp / VERIFIED).write_text(v.digest)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        try:
            tmp.rename(dest)
        except OSError:
            if use_cache and _cached(v, dest):
                return dest  # another process filled the cache first; same verified bytes
            raise
        tmp = None
        return dest
    except OSError as exc:
        raise CatalogError(f"fetch {v.ref} into {dest}: {exc}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
