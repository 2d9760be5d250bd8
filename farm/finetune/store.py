"""Where the fine-tuning API keeps its own things, on any fsspec URL (local under FARM_HOME by
default, s3:// in production), every key under the customer's own prefix:

    <root>/<customer>/files/<file id>.jsonl   the uploaded bytes (what the trainer reads)
    <root>/<customer>/files/<file id>.json    the file object (status, bytes, format, ...)
    <root>/<customer>/jobs/<job id>.json      the API side of a job (training file, suffix, metadata, ...)
    <root>/<customer>/idempotency/<sha>.json  create-request keys -> job id

Job state itself lives in the queue; this store only holds what the queue has no place for.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from farm.finetune.errors import bad_request
from farm.manifest import check_name


def default_root() -> str:
    import os

    from farm.settings import farm_home

    return os.environ.get("FARM_FINETUNE") or (farm_home() / "finetune").as_uri()


def safe_customer(customer: str) -> str:
    try:
        return check_name(customer)
    except ValueError as exc:
        raise bad_request(f"customer {customer!r} cannot own files: {exc}") from None


class FinetuneStore:
    """Thread-safe (one lock around writes that must not race, e.g. idempotency keys)."""

    def __init__(self, root: str):
        from fsspec.core import url_to_fs

        from farm.train.data import storage_options

        self.root = root.rstrip("/")
        self.fs, self._base = url_to_fs(self.root, **storage_options(self.root))
        self._base = self._base.rstrip("/")
        self.lock = threading.RLock()

    # ---- keys ---------------------------------------------------------------------------------
    def _path(self, customer: str, *parts: str) -> str:
        return "/".join([self._base, safe_customer(customer), *parts])

    def url(self, customer: str, *parts: str) -> str:
        """The fsspec URL of a key (what a manifest's dataset points at)."""
        return "/".join([self.root, safe_customer(customer), *parts])

    def customers(self) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._base, detail=False))
        except FileNotFoundError:
            return []

    # ---- raw json / bytes ---------------------------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def _write_json(self, path: str, doc: dict) -> None:
        self._write_bytes(path, json.dumps(doc, sort_keys=True).encode())

    def _write_bytes(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{threading.get_ident()}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)  # readers see the old or the new document, never half of one

    def _list_json(self, customer: str, folder: str) -> list[dict]:
        try:
            names = self.fs.ls(self._path(customer, folder), detail=False)
        except FileNotFoundError:
            return []
        docs = [self._read_json(n) for n in names if n.endswith(".json")]
        return [d for d in docs if d is not None]

    # ---- files --------------------------------------------------------------------------------
    def put_file(self, customer: str, meta: dict, data: bytes) -> None:
        """Content first, then the object: a listed file always has its bytes."""
        with self.lock:
            self._write_bytes(self._path(customer, "files", f"{meta['id']}.jsonl"), data)
            self._write_json(self._path(customer, "files", f"{meta['id']}.json"), meta)

    def file(self, customer: str, file_id: str) -> dict | None:
        if not _safe_id(file_id):
            return None
        return self._read_json(self._path(customer, "files", f"{file_id}.json"))

    def file_url(self, customer: str, file_id: str) -> str:
        return self.url(customer, "files", f"{file_id}.jsonl")

    def file_bytes(self, customer: str, file_id: str) -> bytes:
        with self.fs.open(self._path(customer, "files", f"{file_id}.jsonl"), "rb") as f:
            return f.read()

    def files(self, customer: str) -> list[dict]:
        return self._list_json(customer, "files")

    def delete_file(self, customer: str, file_id: str) -> None:
        with self.lock:
            for ext in ("json", "jsonl"):  # the object first: a half-deleted file is not listed
                try:
                    self.fs.rm(self._path(customer, "files", f"{file_id}.{ext}"))
                except FileNotFoundError:
                    pass

    def stored_bytes(self, customer: str) -> int:
        return sum(int(m.get("bytes") or 0) for m in self.files(customer))

    # ---- jobs ---------------------------------------------------------------------------------
    def put_job(self, customer: str, record: dict) -> None:
        self._write_json(self._path(customer, "jobs", f"{record['queue_id']}.json"), record)

    def job(self, customer: str, queue_id: str) -> dict | None:
        if not _safe_id(queue_id):
            return None
        return self._read_json(self._path(customer, "jobs", f"{queue_id}.json"))

    def jobs(self, customer: str) -> list[dict]:
        return self._list_json(customer, "jobs")

    # ---- idempotency --------------------------------------------------------------------------
    def idempotent(self, customer: str, key: str) -> dict | None:
        return self._read_json(self._path(customer, "idempotency", f"{key}.json"))

    def remember(self, customer: str, key: str, doc: dict[str, Any]) -> None:
        self._write_json(self._path(customer, "idempotency", f"{key}.json"), doc)


def _safe_id(ident: str) -> bool:
    return bool(ident) and len(ident) <= 100 and all(c.isalnum() or c in "-_" for c in ident)
