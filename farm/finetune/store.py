"""Where the fine-tuning API keeps its own things, on any fsspec URL (local under FARM_HOME by
default, s3:// in production), every key under the customer's own prefix:

    <root>/<customer>/files/<file id>.jsonl   the uploaded bytes (what the trainer reads)
    <root>/<customer>/files/<file id>.json    the file object (status, bytes, format, ...)
    <root>/<customer>/usage.json              files and bytes the customer keeps (the quota's count)
    <root>/<customer>/jobs/<job id>.json      a job that failed validation (it has no queue row)

Job state itself lives in the queue, and so does the API's record of every queued job (written in
the submit's transaction) and the Idempotency-Keys. Jobs and keys stored here by older versions are
still read. `usage.json` moves only by compare-and-swap (the catalog's Store: an exclusive create, a
conditional PUT on S3), so replicas sharing this store cannot both take the last of a quota.
"""

from __future__ import annotations

import json
import secrets

from farm.finetune.errors import bad_request, quota
from farm.manifest import check_name

MAX_CAS_TRIES = 50


def default_root() -> str:
    from farm.settings import Settings

    return Settings.resolve().finetune_url


def safe_customer(customer: str) -> str:
    try:
        return check_name(customer)
    except ValueError as exc:
        raise bad_request(f"customer {customer!r} cannot own files: {exc}") from None


class FinetuneStore:
    """Thread-safe; safe to share between processes (replicas): what must not race is a CAS."""

    def __init__(self, root: str):
        from fsspec.core import url_to_fs

        from farm.train.data import storage_options

        self.root = root.rstrip("/")
        self.fs, self._base = url_to_fs(self.root, **storage_options(self.root))
        self._base = self._base.rstrip("/")
        self._cas = None  # the catalog Store on the same root, for usage.json (opened on first use)

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
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"  # unique across replicas too
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
    def put_file(self, customer: str, meta: dict, data: bytes, *, max_stored_bytes: int, max_files: int) -> None:
        """Reserve the file's bytes (content + name) and one file in the customer's usage, then write
        the content, then the object: a listed file always has its bytes. A failed write gives the
        reservation back; a 429 when the file does not fit."""
        charge = charge_of(meta, data)
        self._reserve(customer, charge, max_stored_bytes=max_stored_bytes, max_files=max_files)
        try:
            self._write_bytes(self._path(customer, "files", f"{meta['id']}.jsonl"), data)
            self._write_json(self._path(customer, "files", f"{meta['id']}.json"), meta)
        except BaseException:
            self._move_usage(customer, -charge, -1)
            raise

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

    def delete_file(self, customer: str, meta: dict) -> None:
        """Delete a file (the object first: a half-deleted file is not listed) and give its bytes back."""
        file_id = meta["id"]
        for ext in ("json", "jsonl"):
            try:
                self.fs.rm(self._path(customer, "files", f"{file_id}.{ext}"))
            except FileNotFoundError:
                if ext == "json":
                    return  # someone else deleted it (and gave its bytes back)
        self._move_usage(customer, -charge_of(meta), -1)

    # ---- usage (the stored-bytes and file-count quotas) ----------------------------------------
    def _store(self):
        if self._cas is None:
            from farm.catalog.store import open_store

            self._cas = open_store(self.root)
        return self._cas

    def _usage_key(self, customer: str) -> str:
        return f"{safe_customer(customer)}/usage.json"

    def _read_usage(self, customer: str) -> tuple[dict, str | None]:
        """(usage, tag); a customer without a record (new, or files from before records) is counted
        from a listing once, and that count is what the first swap (an exclusive create) writes."""
        got = self._store().read_tagged(self._usage_key(customer))
        if got is not None:
            return json.loads(got[0]), got[1]
        metas = self.files(customer)
        return {"files": len(metas), "bytes": sum(charge_of(m) for m in metas), "seq": 0}, None

    def usage(self, customer: str) -> dict:
        """{files, bytes}: what the customer keeps, as the quota counts it."""
        doc, _ = self._read_usage(customer)
        return {"files": int(doc["files"]), "bytes": int(doc["bytes"])}

    def _swap_usage(self, customer: str, change) -> None:
        """Apply change(usage) -> new usage (or raise) by compare-and-swap, retrying on a lost race.
        `seq` grows on every write, so an old tag never matches again (no ABA on equal counts)."""
        for _ in range(MAX_CAS_TRIES):
            doc, tag = self._read_usage(customer)
            new = change(dict(doc))
            new["seq"] = int(doc.get("seq", 0)) + 1
            if self._store().swap(self._usage_key(customer), json.dumps(new, sort_keys=True).encode(), tag):
                return
        raise RuntimeError(f"could not update the usage record of {customer} after {MAX_CAS_TRIES} tries")

    def _reserve(self, customer: str, nbytes: int, *, max_stored_bytes: int, max_files: int) -> None:
        def change(doc: dict) -> dict:
            used, count = int(doc["bytes"]), int(doc["files"])
            if count + 1 > max_files:
                raise quota(f"files quota: {customer} keeps {count} files, the limit is {max_files} "
                            "(delete files first)")
            if used + nbytes > max_stored_bytes:
                raise quota(f"stored bytes quota: {customer} keeps {used} bytes in files (contents and names), "
                            f"the limit is {max_stored_bytes}; this {nbytes}-byte file does not fit "
                            "(delete files first)")
            return {**doc, "bytes": used + nbytes, "files": count + 1}

        self._swap_usage(customer, change)

    def _move_usage(self, customer: str, nbytes: int, nfiles: int) -> None:
        self._swap_usage(customer, lambda doc: {**doc, "bytes": max(0, int(doc["bytes"]) + nbytes),
                                                "files": max(0, int(doc["files"]) + nfiles)})

    # ---- jobs ---------------------------------------------------------------------------------
    def put_job(self, customer: str, record: dict) -> None:
        self._write_json(self._path(customer, "jobs", f"{record['queue_id']}.json"), record)

    def job(self, customer: str, queue_id: str) -> dict | None:
        if not _safe_id(queue_id):
            return None
        return self._read_json(self._path(customer, "jobs", f"{queue_id}.json"))

    def jobs(self, customer: str) -> list[dict]:
        return self._list_json(customer, "jobs")

    # ---- idempotency (older versions kept keys here; new keys live in the queue) -------------------
    def idempotent(self, customer: str, key: str) -> dict | None:
        return self._read_json(self._path(customer, "idempotency", f"{key}.json"))


def charge_of(meta: dict, data: bytes | None = None) -> int:
    """What a file costs against max_stored_bytes: its content and its name."""
    size = len(data) if data is not None else int(meta.get("bytes") or 0)
    return size + len(str(meta.get("filename") or "").encode())


def _safe_id(ident: str) -> bool:
    return bool(ident) and len(ident) <= 100 and all(c.isalnum() or c in "-_" for c in ident)
