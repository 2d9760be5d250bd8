"""Files: upload (checked at once: `processed` or `error` with the first bad line), list, get, delete.

File objects are OpenAI's (`id, object, bytes, created_at, filename, purpose, status,
status_details, expires_at`); the farm's own fields (`format`, `lines`, `text_chars`) stay in the store.
"""

from __future__ import annotations

import secrets
import time

from farm.finetune.errors import ApiError, bad_request, not_found
from farm.finetune.store import FinetuneStore
from farm.finetune.validate import check_file
from farm.serve.auth import Principal

PUBLIC = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at")
PURPOSES = ("fine-tune",)  # what a customer may upload; results are "fine-tune-results"


def public(meta: dict) -> dict:
    return {k: meta.get(k) for k in PUBLIC}


def owner_of(principal: Principal) -> str:
    if principal.customer is None:
        raise bad_request("an admin key owns no files or jobs: upload and create with the customer's key")
    return principal.customer


MAX_FILENAME_BYTES = 255  # a name is stored and charged to the quota: bounded like a file system's


def upload(store: FinetuneStore, principal: Principal, filename: str, purpose: str, data: bytes, *,
           max_file_bytes: int, max_stored_bytes: int, max_files: int) -> dict:
    customer = owner_of(principal)
    if purpose not in PURPOSES:
        raise bad_request(f"purpose {purpose!r} is not supported here (allowed: {', '.join(PURPOSES)})", "purpose")
    if len(data) > max_file_bytes:
        raise ApiError(413, f"file of {len(data)} bytes is over the {max_file_bytes}-byte limit", param="file",
                       code="file_too_large")
    filename = filename or "upload.jsonl"
    if len(filename.encode()) > MAX_FILENAME_BYTES or any(ord(ch) < 32 for ch in filename):
        raise bad_request(f"filename must be at most {MAX_FILENAME_BYTES} UTF-8 bytes without control characters "
                          f"(got {len(filename.encode())} bytes)", "file")
    check = check_file(data)
    meta = {
        "id": f"file-{secrets.token_hex(12)}", "object": "file", "bytes": len(data),
        "created_at": int(time.time()), "filename": filename, "purpose": purpose,
        "status": "processed" if check.ok else "error", "status_details": check.details, "expires_at": None,
        "customer": customer, "format": check.format, "lines": check.lines, "text_chars": check.text_chars,
    }
    store.put_file(customer, meta, data, max_stored_bytes=max_stored_bytes, max_files=max_files)
    return meta


def result_meta(customer: str, file_id: str, filename: str, data: bytes, created_at: float) -> dict:
    """The file object of a job's metrics CSV (rendered from the job on read, never stored)."""
    return {
        "id": file_id, "object": "file", "bytes": len(data), "created_at": int(created_at), "filename": filename,
        "purpose": "fine-tune-results", "status": "processed", "status_details": None, "expires_at": None,
        "customer": customer, "format": "csv", "lines": data.count(b"\n"), "text_chars": 0,
    }


def find(store: FinetuneStore, principal: Principal, file_id: str, param: str | None = None) -> dict:
    """The caller's file (admin: anyone's); another customer's answers 404 like a missing one."""
    customers = store.customers() if principal.admin else [owner_of(principal)]
    for c in customers:
        meta = store.file(c, file_id)
        if meta is not None:
            return meta
    raise not_found("file", file_id, param)


def listing(store: FinetuneStore, principal: Principal, purpose: str | None) -> list[dict]:
    customers = store.customers() if principal.admin else [owner_of(principal)]
    metas = [m for c in customers for m in store.files(c)]
    if purpose:
        metas = [m for m in metas if m.get("purpose") == purpose]
    return metas
