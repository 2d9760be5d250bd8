"""The HTTP routes: /v1/files, /v1/fine_tuning/jobs and /v1/models/{model} as a FastAPI app that the
serve ingress mounts (`extension`). Every error is OpenAI's `{"error": {...}}` body, never FastAPI's
`{"detail": ...}`. Handlers are plain functions: FastAPI runs them in a thread (storage, SQLite).
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from farm.finetune import files as files_api
from farm.finetune.config import FinetuneConfig
from farm.finetune.errors import ApiError, bad_request, not_found
from farm.finetune.mapping import Jobs
from farm.finetune.store import FinetuneStore
from farm.serve.auth import KeyStore, Principal

PREFIXES = ("/v1/files", "/v1/fine_tuning/", "/v1/models/")
MAX_LIMIT = 100


def _page(items: list[dict], after: str | None, limit: int, extra: bool = False) -> dict:
    """{object: list, data, has_more} from items in list order: the ones after `after`, at most limit."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start:start + limit]
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": start + limit < len(items)}
    if extra:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    return body


def _limit(request: Request, default: int = 20, most: int = MAX_LIMIT) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be an integer 1..{most} (got {raw!r})", "limit")
    return int(raw)


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """Form fields and the (filename, bytes) of the `file` part. The stdlib parser keeps the
    service free of an extra dependency; the openai client's multipart is standard RFC 7578."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("POST /v1/files takes multipart/form-data with 'file' and 'purpose'")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise bad_request("malformed multipart body")
    fields: dict[str, str] = {}
    upload = None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            upload = (part.get_filename() or "upload.jsonl", payload)
        elif name:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, upload


def build(cfg: FinetuneConfig, keys: KeyStore, catalog_url: str) -> FastAPI:
    from farm.catalog import Catalog
    from farm.queue import open_store

    store = FinetuneStore(cfg.files_url)
    jobs = Jobs(cfg, store, open_store(cfg.queue_db), Catalog(catalog_url))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # Files are capped by the largest per-file limit of any offered base; quotas by the strictest.
    max_file = max(p.max_file_bytes for p in cfg.bases.values())
    max_stored = min(p.max_stored_bytes for p in cfg.bases.values())

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        headers = {"x-should-retry": "false"} if exc.status in (413, 429) else None  # quotas: retrying won't help
        return JSONResponse(exc.body(), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return JSONResponse(bad_request(f"{'.'.join(map(str, e['loc']))}: {e['msg']}").body(), 400)

    @app.exception_handler(HTTPException)
    async def _http(_req, exc: HTTPException):
        status = exc.status_code
        err = ApiError(status, "no such route" if status == 404 else str(exc.detail), code="unknown_url"
                       if status in (404, 405) else None)
        return JSONResponse(err.body(), status)

    @app.exception_handler(Exception)
    async def _bug(_req, exc: Exception):
        import logging

        logging.getLogger("farm.finetune").exception("internal error", exc_info=exc)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(), 500)

    def who(request: Request) -> Principal:
        p = keys.authenticate(request.headers.get("authorization"))
        if p is None:
            raise ApiError(401, "missing or unknown API key (Authorization: Bearer <key>)", code="invalid_api_key")
        return p

    def json_body(raw: bytes) -> Any:
        import json

        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise bad_request("the request body is not JSON") from None

    # ---- files ----------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(request: Request):
        principal = who(request)
        declared = request.headers.get("content-length")
        cap = max_file + 64 * 1024
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"upload of {declared} bytes is over the {max_file}-byte file limit", param="file",
                           code="file_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise ApiError(413, f"upload is over the {max_file}-byte file limit", param="file", code="file_too_large")
        fields, part = _multipart(request.headers.get("content-type", ""), bytes(raw))
        if part is None:
            raise bad_request("the multipart body has no 'file' part", "file")
        if "purpose" not in fields:
            raise bad_request("purpose is required (fine-tune)", "purpose")
        import asyncio

        meta = await asyncio.to_thread(files_api.upload, store, principal, part[0], fields["purpose"], part[1],
                                       max_file_bytes=max_file, max_stored_bytes=max_stored)
        return files_api.public(meta)

    @app.get("/v1/files")
    def list_files(request: Request):
        principal = who(request)
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be asc or desc (got {order!r})", "order")
        metas = sorted(files_api.listing(store, principal, q.get("purpose")),
                       key=lambda m: (m["created_at"], m["id"]), reverse=order == "desc")
        return _page([files_api.public(m) for m in metas], q.get("after"), _limit(request, 10000, 10000), extra=True)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, request: Request):
        return files_api.public(files_api.find(store, who(request), file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, request: Request):
        meta = files_api.find(store, who(request), file_id)
        return Response(store.file_bytes(meta["customer"], file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request):
        meta = files_api.find(store, who(request), file_id)
        store.delete_file(meta["customer"], file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs -----------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        import asyncio

        principal = who(request)
        body = json_body(await request.body())
        retry = request.headers.get("x-stainless-retry-count", "0")
        return await asyncio.to_thread(jobs.create, principal, body,
                                       idempotency_key=request.headers.get("idempotency-key"),
                                       retry_count=int(retry) if retry.isdigit() else 0)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request):
        principal = who(request)
        items = [jobs.render(r) for r in jobs.records(principal)]
        return _page(items, request.query_params.get("after"), _limit(request))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        return jobs.get(who(request), job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, request: Request):
        return jobs.cancel(who(request), job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, request: Request):
        events = jobs.events(who(request), job_id)
        body = _page(events, request.query_params.get("after"), _limit(request))
        for e in body["data"]:
            e.pop("_seq", None)
        return body

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, request: Request):
        return _page(jobs.checkpoints(who(request), job_id), request.query_params.get("after"),
                     _limit(request, 10))

    # ---- models by name (names hold '/' and '@'; '%2F' and raw both arrive here decoded) ---------
    @app.get("/v1/models/{model:path}")
    def get_model(model: str, request: Request):
        principal = who(request)
        model = unquote(model)
        if model in cfg.bases:
            return {"id": model, "object": "model", "owned_by": "farm", "created": 0}
        from farm.catalog import parse_ref
        from farm.errors import CatalogError

        try:
            ref = parse_ref(model)
            if not principal.may_use(ref.customer):
                raise not_found("model", model, "model")
            v = jobs.catalog.resolve(ref)
        except CatalogError:
            raise not_found("model", model, "model") from None
        return {"id": model, "object": "model", "owned_by": v.customer, "created": 0, "version": v.ref}

    return app


def extension(serve_cfg, keys: KeyStore) -> tuple[tuple[str, ...], Any]:
    """What the serve ingress mounts: (path prefixes, ASGI app). Config from serve_cfg.extra["finetune"]."""
    cfg = FinetuneConfig.model_validate(serve_cfg.extra["finetune"])
    return PREFIXES, build(cfg, keys, serve_cfg.catalog_url)
