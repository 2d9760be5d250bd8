"""The HTTP routes: /v1/files, /v1/fine_tuning/jobs and /v1/models/{model} as a FastAPI app that the
serve ingress mounts (`extension`). Every error is OpenAI's `{"error": {...}}` body, never FastAPI's
`{"detail": ...}`. Handlers are plain functions: FastAPI runs them in a thread (storage, SQLite).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from farm.finetune import files as files_api
from farm.finetune import multipart
from farm.finetune.config import FinetuneConfig
from farm.finetune.errors import ApiError, bad_request, not_found
from farm.finetune.mapping import Jobs
from farm.finetune.store import FinetuneStore
from farm.serve.auth import KeyStore, Principal

PREFIXES = ("/v1/files", "/v1/fine_tuning/", "/v1/models/")
MAX_LIMIT = 100
MAX_JSON_BYTES = 64 * 1024  # a create request is a few hundred bytes; metadata at most ~10 KiB
MAX_JSON_DEPTH = 16  # the deepest create body is method.supervised.hyperparameters.<name>


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (use a finite number)")


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: a 400 (never a 500) for bad JSON, NaN/Infinity, or nesting deeper than
    MAX_JSON_DEPTH (which would otherwise overflow the recursion of json/pydantic code downstream)."""
    try:
        doc = json.loads(raw or b"null", parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not JSON: {exc}") from None
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
        elif isinstance(node, float) and not math.isfinite(node):  # 1e999 parses to inf
            raise bad_request(f"the request body holds a number out of range ({node})")
    return doc


async def read_capped(request: Request, cap: int, what: str, param: str | None = None) -> list[bytes]:
    """The body's chunks, refusing (413) a declared or streamed length over `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"{what} of {declared} bytes is over the {cap}-byte limit", param=param,
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"{what} is over the {cap}-byte limit", param=param, code="request_too_large")
        chunks.append(chunk)
    return chunks


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


def build(cfg: FinetuneConfig, keys: KeyStore, catalog_url: str) -> FastAPI:
    from farm.catalog import Catalog
    from farm.queue import open_store

    store = FinetuneStore(cfg.files_url)
    jobs = Jobs(cfg, store, open_store(cfg.queue_db), Catalog(catalog_url))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # Files are capped by the largest per-file limit of any offered base; quotas by the strictest.
    max_file = max(p.max_file_bytes for p in cfg.bases.values())
    max_stored = min(p.max_stored_bytes for p in cfg.bases.values())
    max_files = min(p.max_files for p in cfg.bases.values())

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

    # ---- files ----------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(request: Request):
        principal = who(request)
        cap = max_file + 64 * 1024  # the file and the multipart framing around it
        try:
            chunks = await read_capped(request, cap, "upload", "file")
        except ApiError as exc:
            raise ApiError(413, f"{exc.message} (the file limit is {max_file} bytes)", param="file",
                           code="file_too_large") from None
        content_type = request.headers.get("content-type", "")

        def parse_and_store() -> dict:
            form = multipart.parse(content_type, chunks)
            if form.data is None:
                raise bad_request("the multipart body has no 'file' part", "file")
            if "purpose" not in form.fields:
                raise bad_request("purpose is required (fine-tune)", "purpose")
            return files_api.upload(store, principal, form.filename, form.fields["purpose"], form.data,
                                    max_file_bytes=max_file, max_stored_bytes=max_stored, max_files=max_files)

        return files_api.public(await asyncio.to_thread(parse_and_store))

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
        principal = who(request)
        result = jobs.result_file(principal, file_id)
        return files_api.public(result[0] if result else files_api.find(store, principal, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, request: Request):
        principal = who(request)
        result = jobs.result_file(principal, file_id)
        if result is not None:
            return Response(result[1], media_type="application/octet-stream")
        meta = files_api.find(store, principal, file_id)
        return Response(store.file_bytes(meta["customer"], file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request):
        principal = who(request)
        if jobs.result_file(principal, file_id) is not None:
            raise bad_request(f"{file_id} is a job's result file, rendered from the job: there is nothing to delete")
        meta = files_api.find(store, principal, file_id)
        jobs.check_unused(meta)
        store.delete_file(meta["customer"], meta)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs -----------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        principal = who(request)
        raw = b"".join(await read_capped(request, MAX_JSON_BYTES, "the request body"))
        retry = request.headers.get("x-stainless-retry-count", "0")

        def create() -> dict:
            return jobs.create(principal, parse_json(raw), idempotency_key=request.headers.get("idempotency-key"),
                               retry_count=int(retry) if retry.isdigit() else 0)

        return await asyncio.to_thread(create)

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
